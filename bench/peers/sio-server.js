// Socket.IO 4 server (benchmark peer) with connection-state recovery: a
// client joins room GROUP with /socket.io/?EIO=4&transport=websocket&room=GROUP
// and every "m" event is sent to the other members of its room. Recovery
// keeps missed packets in memory for reconnects within two minutes; nothing
// is written to disk.
const http = require('http');
const { Server } = require('socket.io');
const port = Number(process.argv[2] || 0);
const srv = http.createServer();
const io = new Server(srv, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
  connectionStateRecovery: { maxDisconnectionDuration: 2 * 60 * 1000, skipMiddlewares: true },
});
io.on('connection', (socket) => {
  const room = String(socket.handshake.query.room || '');
  socket.join(room);
  socket.on('m', (data) => socket.to(room).emit('m', data));
});
srv.listen(port, '127.0.0.1', () => console.log(`ws://127.0.0.1:${srv.address().port}`));
