#!/usr/bin/env node
'use strict'
/*
 * dht-node.js - a real bittorrent-dht 10.0.7 node (the one WebTorrent 1.9.7
 * uses) driven over stdio: a local bootstrap node for the DHT tests, or a JS
 * DHT client that queries the Python node.
 *
 * Environment:
 *   DHT_BOOTSTRAP  comma-separated 127.x.x.x:port list; empty or unset = no
 *                  bootstrap at all (a first node). Never the public routers.
 *   DHT_PORT       UDP port to listen on, default 0 = any
 *
 * Network safety: refuses to start unless the process sits in a network
 * namespace whose only interface is loopback (`unshare -n`), and refuses any
 * bootstrap address outside 127.0.0.0/8.
 *
 * stdout: JSON lines
 *   {"event":"ready","port","nodeId"}
 *   {"event":"query","q","host","port"}            every query received
 *   {"event":"announce","host","port","infoHash"}  a peer announced to us
 *   {"event":"node","host","port","id"}            a node joined our table
 *   {"event":"peer","host","port","infoHash","fromPort"}  a lookup found a peer (fromPort: the
 *                                                 UDP port of the node that told us)
 *   {"event":"lookup-done","id","infoHash","error"}
 *   {"event":"announced","id","infoHash","error"}
 *   {"event":"nodes","id","nodes":[{host,port,id}]}
 *   {"event":"error","message"}
 * stdin: JSON lines
 *   {"cmd":"lookup","id","infoHash"}   {"cmd":"announce","id","infoHash","port"}
 *   {"cmd":"nodes","id"}               {"cmd":"close"}  (stdin EOF closes too)
 */

const os = require('os')
const readline = require('readline')
const DHT = require('bittorrent-dht')

console.log = console.info = console.debug = (...a) => console.error(...a)
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const fail = (message) => { emit({ event: 'error', message }); process.exit(2) }
process.on('uncaughtException', (err) => emit({ event: 'error', message: String(err && err.stack) }))

const onlyLoopback = Object.values(os.networkInterfaces()).every((addrs) => addrs.every((a) => a.internal))
if (!onlyLoopback) fail('dht-node.js refused: run it inside `unshare -n` (non-loopback interface present)')

const bootstrap = (process.env.DHT_BOOTSTRAP || '').split(',').map((s) => s.trim()).filter(Boolean)
for (const entry of bootstrap) {
  if (!/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$/.test(entry)) fail(`bootstrap ${entry} is not 127.x.x.x:port`)
}

const dht = new DHT({ bootstrap: bootstrap.length ? bootstrap : false })
dht.on('error', (err) => emit({ event: 'error', message: String(err && err.message) }))
dht.on('warning', (err) => console.error('dht warning:', err && err.message))
dht.on('node', (node) => emit({ event: 'node', host: node.host, port: node.port, id: node.id.toString('hex') }))
dht.on('announce', (peer, infoHash) => emit({ event: 'announce', host: peer.host, port: peer.port, infoHash: infoHash.toString('hex') }))
dht.on('peer', (peer, infoHash, from) => emit({
  event: 'peer', host: peer.host, port: peer.port, infoHash: infoHash.toString('hex'), fromPort: from ? from.port : null
}))
dht._rpc.on('query', (query, peer) => emit({ event: 'query', q: String(query.q), host: peer.address, port: peer.port }))

dht.listen(Number(process.env.DHT_PORT || 0), '127.0.0.1', () => {
  emit({ event: 'ready', port: dht.address().port, nodeId: dht.nodeId.toString('hex') })
})

const COMMANDS = {
  lookup (c) {
    dht.lookup(c.infoHash, (err) => emit({ event: 'lookup-done', id: c.id, infoHash: c.infoHash, error: err ? err.message : null }))
  },
  announce (c) {
    dht.announce(c.infoHash, c.port, (err) => emit({ event: 'announced', id: c.id, infoHash: c.infoHash, error: err ? err.message : null }))
  },
  nodes (c) {
    emit({ event: 'nodes', id: c.id, nodes: dht.toJSON().nodes })
  },
  close () { shutdown() }
}

let closing = false
function shutdown () {
  if (closing) return
  closing = true
  setTimeout(() => process.exit(0), 2000).unref()
  dht.destroy(() => process.exit(0))
}

readline.createInterface({ input: process.stdin, terminal: false }).on('line', (line) => {
  if (!line.trim()) return
  let cmd
  try { cmd = JSON.parse(line) } catch (err) { return emit({ event: 'error', message: `bad JSON: ${line}` }) }
  const fn = Object.prototype.hasOwnProperty.call(COMMANDS, cmd.cmd) && COMMANDS[cmd.cmd]
  if (!fn) return emit({ event: 'error', message: `unknown cmd ${cmd.cmd}` })
  try { fn(cmd) } catch (err) { emit({ event: 'error', message: err.message }) }
}).on('close', shutdown)
process.on('SIGTERM', shutdown)
