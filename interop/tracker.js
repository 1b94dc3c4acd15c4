#!/usr/bin/env node
'use strict'
/*
 * tracker.js - a local WebSocket tracker (bittorrent-tracker 9.19.0 Server, the
 * code behind the public wss:// WebTorrent trackers) for the WebRTC tests.
 *
 * Environment:
 *   TR_PORT      listen port on 127.0.0.1 (default 0 = any)
 *   TR_INTERVAL  announce interval in ms (default 10 min); the WebSocket
 *                tracker tells clients a fifth of it, in seconds
 *
 * stdout: JSON lines only
 *   {"event":"ready","port":N,"url":"ws://127.0.0.1:N"}
 *   {"event":"announce","peer":<hex peer id>,"type":"start"|"update"|"stop"}
 *   {"event":"warning","message"}
 * stdin EOF (or {"cmd":"close"}) closes it.
 *
 * Network safety: it listens on 127.0.0.1 only, with no HTTP or UDP tracker.
 */
const readline = require('readline')
const { Server } = require('bittorrent-tracker')

console.log = console.info = console.debug = (...a) => console.error(...a)
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const server = new Server({
  http: false, // the WebSocket server makes its own plain http server for the upgrade
  udp: false,
  ws: true,
  stats: false,
  interval: Number(process.env.TR_INTERVAL || 0) || undefined
})
server.on('error', (err) => emit({ event: 'error', message: String(err && err.message) }))
server.on('warning', (err) => emit({ event: 'warning', message: String(err && err.message) }))
for (const type of ['start', 'update', 'stop']) {
  server.on(type, (peer) => emit({ event: 'announce', peer, type }))
}
server.on('listening', () => {
  const port = server.ws.address().port
  emit({ event: 'ready', port, url: `ws://127.0.0.1:${port}` })
})
server.listen(Number(process.env.TR_PORT || 0), '127.0.0.1')

let closing = false
function close () {
  if (closing) return
  closing = true
  server.close(() => process.exit(0))
  setTimeout(() => process.exit(0), 1000).unref()
}
const rl = readline.createInterface({ input: process.stdin, terminal: false })
rl.on('line', (line) => { if (line.includes('close')) close() })
rl.on('close', close)
process.on('SIGTERM', close)
