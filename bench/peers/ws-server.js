// Node `ws` broadcast server (benchmark peer): every text message
// "GROUP|..." is sent to every other connection that joined GROUP with
// ws://HOST:PORT/?room=GROUP. Nothing is stored: the raw, non-durable baseline.
const { WebSocketServer } = require('ws');
const port = Number(process.argv[2] || 0);
const rooms = new Map();
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('listening', () => console.log(`ws://127.0.0.1:${wss.address().port}`));
wss.on('connection', (ws, req) => {
  const room = new URL(req.url, 'http://x').searchParams.get('room') || '';
  if (!rooms.has(room)) rooms.set(room, new Set());
  const members = rooms.get(room);
  members.add(ws);
  ws.on('message', (data, isBinary) => {
    for (const m of members) if (m !== ws && m.readyState === 1) m.send(data, { binary: isBinary });
  });
  ws.on('close', () => members.delete(ws));
});
