#!/usr/bin/env node
'use strict'
/*
 * peer.js - a real bugout 0.0.13 / WebTorrent 1.9.7 peer driven over stdio,
 * used as the JavaScript counterpart in interop tests of the Python worker.
 *
 * stdin : one JSON command per line   (see COMMANDS below)
 * stdout: one JSON event per line      (nothing else is ever written there)
 * stderr: debug output (e.g. DEBUG=bugout,webtorrent*)
 *
 * Environment:
 *   BO_ID         bugout identifier (required)
 *   BO_PORT       TCP listen port for WebTorrent (torrentPort), default 0 = any
 *   BO_SEED       optional bugout seed (bs58check), gives a stable address
 *   BO_MODE       "loopback" (default), "lsd", "dht" or "webrtc"
 *   BO_DHT_BOOTSTRAP  for BO_MODE=dht: comma-separated 127.x.x.x:port list of
 *                 the local DHT bootstrap node(s) (required, never the public routers)
 *   BO_TRACKER    webrtc mode: the local WebSocket tracker, ws://127.0.0.1:PORT
 *   BO_NUMWANT    webrtc mode: offers per announce (default 5; 0 = only answer others' offers)
 *   BO_HEARTBEAT  optional bugout heartbeat interval in ms
 *   BO_NODELAY    "1": set TCP_NODELAY on every wire's socket (JS peers do not;
 *                 default off, to behave exactly like them)
 *   BO_STRICT     "1": exit(1) after reporting an uncaught exception, the way
 *                 an unprotected JS peer would crash (default: keep running)
 *
 * Network safety:
 *   loopback - no DHT, no LSD, no trackers, no uTP, no web seeds, and an empty
 *              announce list, so the only traffic is TCP we are dialled on or
 *              that we dial with addPeer.  (WebTorrent 1.9.7 has no NAT-PMP /
 *              UPnP code at all; those options only exist from 2.x.)
 *   lsd      - as the JS queue-xec peers run, minus DHT and trackers: LSD
 *              multicast is on, so it refuses to start unless the process sits
 *              in a network namespace whose only interface is loopback
 *              (`unshare -n`, lo up, route 224.0.0.0/4 via lo).
 *   dht      - as the JS queue-xec peers run on the internet, minus LSD and
 *              trackers: a BEP 5 DHT node bootstrapped only from
 *              BO_DHT_BOOTSTRAP (127.x addresses); it too refuses to start
 *              outside a loopback-only network namespace.
 *   webrtc   - as a browser or a Node peer with @roamhq/wrtc: the one tracker in
 *              BO_TRACKER (ws://127.0.0.1 only) carries offers and answers, ICE
 *              uses no STUN/TURN server (iceServers: []), and the wire runs on an
 *              RTCDataChannel. No DHT, LSD or uTP. Like lsd, it refuses to start
 *              outside a network namespace whose interfaces are all loopback.
 */

const os = require('os')
const readline = require('readline')

// Keep stdout for our JSON lines only: anything a library prints goes to stderr.
console.log = console.info = console.debug = (...a) => console.error(...a)

function emit (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function reportError (err, extra) {
  const message = (err && err.message) ? err.message : String(err)
  emit(Object.assign({ event: 'error', message }, extra || {}))
}

const STRICT = process.env.BO_STRICT === '1'
process.on('uncaughtException', (err) => {
  reportError(err, { uncaught: true, stack: String(err && err.stack) })
  if (STRICT) process.exit(1)
})
process.on('unhandledRejection', (err) => reportError(err, { uncaught: true }))

const Bugout = require('bugout')
const WebTorrent = require('webtorrent')

// ---------------------------------------------------------------- config
const identifier = process.env.BO_ID
if (!identifier) {
  reportError('BO_ID is required')
  process.exit(2)
}
const mode = process.env.BO_MODE || 'loopback'
const port = Number(process.env.BO_PORT || 0)
const heartbeat = process.env.BO_HEARTBEAT ? Number(process.env.BO_HEARTBEAT) : undefined
const tracker = process.env.BO_TRACKER || ''
if (mode === 'webrtc' && !/^ws:\/\/127\.0\.0\.1:\d+\/?$/.test(tracker)) {
  reportError('BO_MODE=webrtc needs BO_TRACKER=ws://127.0.0.1:PORT (a local tracker only)')
  process.exit(2)
}
const announce = mode === 'webrtc' ? [tracker] : []

/** WebTorrent client options for each mode (option names checked in webtorrent 1.9.7 index.js). */
function webtorrentOpts () {
  const common = {
    torrentPort: port,
    dht: false, // index.js:121 - no BEP 5 DHT node (UDP to public bootstrap nodes)
    tracker: false, // index.js:77 -> torrent-discovery index.js:64 - no tracker client at all
    webSeeds: false // index.js:143 - no BEP 19 HTTP web seeds
    // blocklist is left unset: index.js:151 would otherwise fetch it over HTTP
  }
  if (mode === 'loopback') {
    return Object.assign(common, {
      lsd: false, // index.js:78 - no BEP 14 multicast
      utp: false // index.js:81 - no UDP socket / uTP dialling
    })
  }
  if (mode === 'lsd') {
    return Object.assign(common, { lsd: true }) // uTP left at its default, as real JS peers
  }
  if (mode === 'dht') {
    // index.js:123 - new DHT(Object.assign({nodeId}, opts.dht)): our bootstrap list only
    return Object.assign(common, { lsd: false, dht: { bootstrap: dhtBootstrap() } })
  }
  if (mode === 'webrtc') {
    return Object.assign(common, {
      lsd: false,
      utp: false,
      // torrent-discovery hands this to bittorrent-tracker's client: its wrtc and
      // rtcConfig go to every simple-peer it makes (websocket-tracker.js _createPeer)
      tracker: {
        wrtc: require('@roamhq/wrtc'),
        rtcConfig: { iceServers: [] },
        // merged into every announce (webtorrent torrent.js, bittorrent-tracker client.js)
        getAnnounceOpts: process.env.BO_NUMWANT ? () => ({ numwant: Number(process.env.BO_NUMWANT) }) : undefined
      }
    })
  }
  throw new Error(`unknown BO_MODE ${mode}`)
}

/** BO_DHT_BOOTSTRAP as a list; only 127.x.x.x:port entries are accepted. */
function dhtBootstrap () {
  const list = (process.env.BO_DHT_BOOTSTRAP || '').split(',').map((s) => s.trim()).filter(Boolean)
  if (!list.length) throw new Error('BO_MODE=dht needs BO_DHT_BOOTSTRAP (local nodes only)')
  for (const entry of list) {
    if (!/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$/.test(entry)) throw new Error(`bootstrap ${entry} is not 127.x.x.x:port`)
  }
  return list
}

/** True when every network interface is a loopback one (i.e. inside `unshare -n`). */
function onlyLoopback () {
  const ifs = os.networkInterfaces()
  return Object.values(ifs).every((addrs) => addrs.every((a) => a.internal))
}

if ((mode === 'lsd' || mode === 'dht' || mode === 'webrtc') && !onlyLoopback()) {
  reportError(`BO_MODE=${mode} refused: run it inside \`unshare -n\` (non-loopback interface present)`)
  process.exit(2)
}

// ---------------------------------------------------------------- peer
let wt, bugout
try {
  wt = new WebTorrent(webtorrentOpts())
  bugout = new Bugout(identifier, {
    wt,
    seed: process.env.BO_SEED || undefined,
    heartbeat,
    announce, // never undefined: bugout's wss defaults are not used, and create-torrent
    // adds no default trackers (it only does when announce is undefined)
    torrentOpts: { announce },
    iceServers: [] // (bugout only reads it when it makes the WebTorrent client itself)
  })
} catch (err) {
  reportError(err)
  process.exit(2)
}

wt.on('error', (err) => reportError(err, { source: 'webtorrent' }))
wt.on('warning', (err) => console.error('webtorrent warning:', err && err.message))

// Optional TCP_NODELAY: find the socket behind each new wire (WebTorrent keeps
// it on the Peer object in torrent._peers) and turn Nagle off.
if (process.env.BO_NODELAY === '1') {
  bugout.torrent.on('wire', (wire) => {
    for (const p of Object.values(bugout.torrent._peers)) {
      if (p.wire === wire && p.conn && typeof p.conn.setNoDelay === 'function') p.conn.setNoDelay(true)
    }
  })
}

// Built-in RPCs. The handler signature is bugout's: (callerAddress, args, reply).
bugout.register('echo', (address, args, reply) => {
  const isObject = args && typeof args === 'object' && !Array.isArray(args)
  reply(isObject ? Object.assign({}, args, { echoedBy: 'js' }) : { args, echoedBy: 'js' })
}, 'returns the args object plus {"echoedBy":"js"}')
bugout.register('whoami', (address, args, reply) => {
  reply({ address: bugout.address() })
}, 'returns {"address": <own address>}')
bugout.register('slow', (address, args, reply) => {
  setTimeout(() => reply(args), 200)
}, 'returns args after 200 ms')

// Library events -> stdout.
bugout.on('seen', (address) => emit({ event: 'seen', address }))
bugout.on('left', (address) => emit({ event: 'left', address }))
// bugout also reports our OWN broadcast messages and pings when a peer echoes
// them back (it does not remember what it sent); `self` flags those.
const isSelf = (address) => address === bugout.address()
bugout.on('ping', (address) => emit({ event: 'ping', address, self: isSelf(address) }))
bugout.on('message', (address, message) => emit({ event: 'message', address, message, self: isSelf(address) }))
bugout.on('connections', (count) => emit({ event: 'wire', count }))
bugout.on('rpc', (address, call, args) => {
  // bugout emits 'rpc' for every incoming call, known or not; say which.
  const known = Object.prototype.hasOwnProperty.call(bugout.api, call)
  emit({ event: 'rpc-called', address, call, args, known })
})

// 'ready' once the torrent is seeding (so addPeer works) and the port is bound.
let ready = false
function maybeReady () {
  if (ready || !wt.listening || !bugout.torrent.infoHash || !bugout.torrent.ready) return
  ready = true
  emit({
    event: 'ready',
    address: bugout.address(),
    pk: bugout.pk,
    ek: bugout.ek,
    port: wt.torrentPort,
    identifier: bugout.identifier,
    infoHash: bugout.torrent.infoHash,
    peerId: Buffer.from(wt.peerId, 'hex').toString('latin1'),
    dhtPort: wt.dht ? wt.dhtPort : null,
    mode
  })
  flushPending()
}
bugout.on('torrent', maybeReady)
wt.on('listening', maybeReady)
bugout.torrent.on('ready', maybeReady)

// ---------------------------------------------------------------- commands
const COMMANDS = {
  addPeer (c) {
    if (!bugout.torrent.addPeer(c.addr)) throw new Error(`addPeer refused ${c.addr}`)
  },
  rpc (c) {
    // Always send an args object: bugout 0.0.13 crashes on a call without `a`.
    const args = c.args === undefined ? {} : c.args
    bugout.rpc(c.address, c.call, args, (result) => {
      emit({ event: 'rpc-result', id: c.id, result })
    })
  },
  send (c) {
    if (c.address) bugout.send(c.address, c.message)
    else bugout.send(c.message)
  },
  ping () {
    bugout.ping()
  },
  leave () {
    // Broadcast bugout's signed 'x' (leaving) packet but keep the wires open.
    // bugout.close() alone sends 'x' and tears the torrent down in the same
    // tick, so over TCP the 'x' never leaves the process (measured). Clearing
    // torrentCreated for the call makes destroy() skip the torrent removal.
    const created = bugout.torrentCreated
    bugout.torrentCreated = false
    try { bugout.close() } finally { bugout.torrentCreated = created }
  },
  peers (c) {
    emit({ event: 'peers', id: c.id, peers: bugout.peers, wires: bugout.torrent.wires.length })
  },
  close () {
    shutdown(0)
  }
}

function handleLine (line) {
  line = line.trim()
  if (!line) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch (err) {
    return reportError(`bad JSON on stdin: ${err.message}`)
  }
  const fn = Object.prototype.hasOwnProperty.call(COMMANDS, cmd.cmd) && COMMANDS[cmd.cmd]
  if (!fn) return reportError(`unknown cmd ${cmd.cmd}`, { id: cmd.id })
  try {
    fn(cmd)
  } catch (err) {
    reportError(err, { cmd: cmd.cmd, id: cmd.id })
  }
}

let closing = false
function shutdown (code) {
  if (closing) return
  closing = true
  const done = () => {
    wt.destroy(() => process.exit(code))
    setTimeout(() => process.exit(code), 2000).unref()
  }
  try {
    // Exactly what a JS peer does: bugout.close() queues a signed 'x' packet
    // and removes the torrent at once (the 'x' is lost; use `leave` first to
    // deliver it). Then the WebTorrent client is destroyed.
    bugout.close()
    setTimeout(done, 50)
  } catch (err) {
    reportError(err)
    done()
  }
}

// Commands (and EOF) that arrive before 'ready' wait for it: addPeer, for one,
// throws until the torrent has its infohash.
const pending = []
let stdinEnded = false
function flushPending () {
  while (pending.length) handleLine(pending.shift())
  if (stdinEnded) shutdown(0)
}
const rl = readline.createInterface({ input: process.stdin, terminal: false })
rl.on('line', (line) => (ready ? handleLine(line) : pending.push(line)))
rl.on('close', () => { // stdin EOF
  stdinEnded = true
  if (ready) shutdown(0)
})
process.on('SIGTERM', () => shutdown(0))
process.on('SIGINT', () => shutdown(0))
