// JVM tests of the generated Kotlin bindings against a real `keepwire serve`:
// the same path as the Python tests (login, send and receive between two
// clients, background notifications, sync_once against a relay that is down
// and then up, a push wake-up, a token provider that refreshes once,
// callbacks that call the client). Run by bindings/ci.sh:
//   java -Djna.library.path=DIR -cp ... KeepwireTestKt KEEPWIRE_BIN WORK_DIR
import dev.keepwire.*
import java.io.File
import java.util.Base64
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.TimeUnit
import javax.crypto.Mac
import javax.crypto.spec.SecretKeySpec

const val T = 30_000L

lateinit var keepwireBin: String
lateinit var work: File

fun waitUntil(what: String, within: Long = T, cond: () -> Boolean) {
    val deadline = System.currentTimeMillis() + within
    while (!cond()) {
        if (System.currentTimeMillis() > deadline) throw AssertionError("timed out waiting for $what")
        Thread.sleep(20)
    }
}

fun check(ok: Boolean, what: () -> String) {
    if (!ok) throw AssertionError(what())
}

class Relay(val dir: File, val extra: List<String> = emptyList()) {
    val db = File(dir, "relay.db")
    var listen = "127.0.0.1:0"
    var url = ""
    var proc: Process? = null

    init { start() }

    fun start() {
        val p = ProcessBuilder(listOf(keepwireBin, "serve", "--listen", listen, "--db", db.path) + extra)
            .redirectError(ProcessBuilder.Redirect.DISCARD)
            .start()
        val line = p.inputStream.bufferedReader().readLine() ?: ""
        check(line.startsWith("ws://")) { "the relay did not start: $line" }
        url = line
        listen = line.removePrefix("ws://")
        proc = p
    }

    fun stop() {
        proc?.let {
            it.destroy() // SIGTERM: a clean shutdown
            if (!it.waitFor(10, TimeUnit.SECONDS)) it.destroyForcibly().waitFor()
        }
        proc = null
    }

    fun user(name: String): String {
        val p = ProcessBuilder(keepwireBin, "admin", "--db", db.path, "user", "add", name).start()
        val out = p.inputStream.bufferedReader().readText().trim().lines().last()
        check(p.waitFor() == 0) { "user add $name failed" }
        return out
    }
}

/** The OS name of the calling thread (JNA gives attached native threads
 * Java names of its own; the kernel keeps Rust's, cut to 15 bytes). */
fun nativeThreadName(): String = File("/proc/thread-self/comm").readText().trim()

class Recorder : EventListener {
    val events = CopyOnWriteArrayList<Event>()
    val threads = CopyOnWriteArrayList<String>()
    override fun onEvent(event: Event) {
        threads.add(nativeThreadName())
        events.add(event)
    }
    fun messages() = events.filterIsInstance<Event.MessageReceived>().map { it.message }
    fun notifications() = events.filterIsInstance<Event.ShowNotification>().map { it.notification }
}

fun home(name: String) = File(work, name).apply { deleteRecursively() }.path

val SECRET = "kotlin-binding-tests-secret-of-enough-length".toByteArray()

fun jwt(user: String, ttl: Long): String {
    val b64 = Base64.getUrlEncoder().withoutPadding()
    val now = System.currentTimeMillis() / 1000
    val head = b64.encodeToString("""{"alg":"HS256","typ":"JWT"}""".toByteArray())
    val body = b64.encodeToString("""{"sub":"$user","iat":$now,"exp":${now + ttl}}""".toByteArray())
    val mac = Mac.getInstance("HmacSHA256").apply { init(SecretKeySpec(SECRET, "HmacSHA256")) }
    return "$head.$body.${b64.encodeToString(mac.doFinal("$head.$body".toByteArray()))}"
}

fun twoClientsSendAndReceive(relay: Relay) {
    val alice = Client(home("alice1"))
    val bob = Client(home("bob1"))
    val heardA = Recorder()
    val heardB = Recorder()
    alice.setListener(heardA)
    bob.setListener(heardB)
    alice.login(relay.url, relay.user("alice1"))
    bob.login(relay.url, relay.user("bob1"))
    alice.waitConnected(T.toULong())
    bob.waitConnected(T.toULong())
    val conv = alice.createConversation(listOf("bob1"), null, false)
    val cids = (0 until 10).map { alice.send(conv.id, "a$it") }
    check(cids.toSet().size == 10) { "distinct client ids" }
    waitUntil("bob to hear alice") { heardB.messages().count { it.sender == "alice1" } == 10 }
    waitUntil("alice's confirmations") { heardA.events.filterIsInstance<Event.SendConfirmed>().size == 10 }
    val bodies = bob.messages(conv.id, 100u).map { it.body }
    check(bodies == (0 until 10).map { "a$it" }) { "bob's store: $bodies" }
    check(heardA.threads.toSet() == setOf("keepwire-callba")) { "callback thread: ${heardA.threads.toSet()}" }
    check(alice.status().state == ConnectionState.Connected) { "connected" }
    alice.shutdown()
    bob.shutdown()
}

fun backgroundNotificationsAndCallbacksCallingTheClient(relay: Relay) {
    val alice = Client(home("alice2"))
    val heard = Recorder()
    val prefs = alice.prefs()
    check(prefs.background == BackgroundPolicy.WakeOnly) { "wake-only is the default for apps" }
    alice.setPrefs(prefs.copy(background = BackgroundPolicy.Keep))
    alice.login(relay.url, relay.user("alice2"))
    alice.waitConnected(T.toULong())
    val bob = Client(home("bob2"))
    bob.login(relay.url, relay.user("bob2"))
    bob.waitConnected(T.toULong())
    val conv = bob.createConversation(listOf("alice2"), null, false)
    // A listener that replies from inside the callback.
    alice.setListener(object : EventListener {
        override fun onEvent(event: Event) {
            heard.onEvent(event)
            if (event is Event.MessageReceived && event.message.sender == "bob2") {
                alice.status()
                alice.send(conv.id, "re: ${event.message.body}")
            }
        }
    })
    alice.setAppState(AppState.BACKGROUND)
    for (i in 0 until 3) bob.send(conv.id, "later $i")
    waitUntil("notifications") { heard.notifications().sumOf { it.messageIds.size } == 3 }
    val last = heard.notifications().last()
    check(last.unread == 3uL && last.title == "3 new messages from bob2" && last.tag == "keepwire-conv-${conv.id}") { "$last" }
    waitUntil("the replies sent from the callback") {
        bob.messages(conv.id, 100u).count { it.body.startsWith("re: later") } == 3
    }
    alice.notificationOpened(conv.id)
    alice.shutdown()
    bob.shutdown()
}

fun syncOnceDownThenUpAndOnPush(relay: Relay) {
    val bob = Client(home("bob3"))
    bob.login(relay.url, relay.user("bob3"))
    bob.waitConnected(T.toULong())
    val alice = Client(home("alice3"))
    val heard = Recorder()
    alice.setListener(heard)
    alice.setAppState(AppState.BACKGROUND)
    alice.login(relay.url, relay.user("alice3"))
    check(alice.syncOnce(T.toULong()).outcome == SyncOutcome.CaughtUp) { "first sync" }
    val conv = bob.createConversation(listOf("alice3"), null, false)
    for (i in 0 until 5) bob.send(conv.id, "m$i")
    // Stored by the relay: bob's own copies came back through his inbox.
    waitUntil("bob's sends stored") { bob.messages(conv.id, 100u).size == 5 }
    relay.stop()
    val started = System.currentTimeMillis()
    val down = alice.syncOnce(1500u)
    check(down.outcome is SyncOutcome.Unreachable) { "$down" }
    check(System.currentTimeMillis() - started < 3000) { "deadline honoured" }
    relay.start()
    val up = alice.syncOnce(T.toULong())
    check(up.outcome == SyncOutcome.CaughtUp && up.received == 5uL) { "$up" }
    // Queued before syncOnce returned; delivered on the callback thread.
    waitUntil("the notification event") { heard.notifications().isNotEmpty() }
    check(heard.notifications().size == 1) { "one coalesced notification: ${heard.notifications()}" }
    for (i in 0 until 3) bob.send(conv.id, "pushed $i")
    waitUntil("bob's sends stored") { bob.messages(conv.id, 100u).size == 8 }
    val result = alice.onPush("registration-id".toByteArray(), 8000u)
    // Three new messages; eight unread in all (nobody opened the app since the sync).
    check(result.report.outcome == SyncOutcome.CaughtUp && result.show.size == 1 &&
        result.show[0].messageIds.size == 3 && result.show[0].unread == 8uL) { "$result" }
    check(alice.onPush(ByteArray(0), 8000u).show.isEmpty()) { "at most once" }
    try {
        alice.onPush(ByteArray(5000), 1000u)
        throw AssertionError("an oversized payload was accepted")
    } catch (e: KeepwireException.InvalidInput) {
    }
    alice.shutdown()
    bob.shutdown()
}

fun tokenProviderRefreshesOnce() {
    val dir = File(work, "jwt-relay").apply { deleteRecursively(); mkdirs() }
    val secret = File(dir, "jwt.secret").apply { writeBytes(SECRET) }
    val relay = Relay(dir, listOf("--jwt-secret-file", secret.path))
    try {
        val calls = CopyOnWriteArrayList<String>()
        val alice = Client(home("alice4"))
        val heard = Recorder()
        alice.setListener(heard)
        alice.setTokenProvider(object : TokenProvider {
            override fun fetchToken(): String? {
                calls.add(Thread.currentThread().name)
                return jwt("alice", 3600)
            }
        })
        // Expires while connected: 25 s past exp, within the relay's 30 s leeway.
        alice.login(relay.url, jwt("alice", -25))
        alice.waitConnected(T.toULong())
        waitUntil("the refresh") { calls.size == 1 }
        val bob = Client(home("bob4"))
        bob.login(relay.url, jwt("bob", 3600))
        bob.waitConnected(T.toULong())
        val conv = bob.createConversation(listOf("alice"), null, false)
        bob.send(conv.id, "after the refresh")
        waitUntil("the message") { heard.messages().size == 1 }
        check(calls.size == 1) { "exactly one refresh: $calls" }
        alice.shutdown()
        bob.shutdown()
    } finally {
        relay.stop()
    }
}

fun main(args: Array<String>) {
    keepwireBin = args[0]
    work = File(args[1]).apply { mkdirs() }
    check(runtimeWorkerThreads() in 1u..2u) { "at most 2 runtime workers" }
    val relay = Relay(File(work, "relay").apply { deleteRecursively(); mkdirs() })
    val tests = listOf<Pair<String, () -> Unit>>(
        "two clients send and receive" to { twoClientsSendAndReceive(relay) },
        "background notifications, callbacks calling the client" to { backgroundNotificationsAndCallbacksCallingTheClient(relay) },
        "sync_once down then up, on_push" to { syncOnceDownThenUpAndOnPush(relay) },
        "a token provider refreshes once" to { tokenProviderRefreshesOnce() },
    )
    var passed = 0
    var failed = 0
    try {
        for ((name, test) in tests) {
            try {
                test()
                passed++
                println("ok   $name")
            } catch (e: Throwable) {
                failed++
                println("FAIL $name: $e")
                e.printStackTrace()
            }
        }
    } finally {
        relay.stop()
    }
    println("$passed passed, $failed failed")
    System.exit(if (failed == 0) 0 else 1)
}
