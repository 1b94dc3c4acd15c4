'use strict'
/*
 * selftest_js.js - two peer.js processes (JS <-> JS) exercise everything the
 * stdio protocol offers.
 *
 *   node selftest_js.js            # loopback mode: B dials A with addPeer
 *   node selftest_js.js lsd        # LSD discovery, no addPeer; run ONLY as
 *     unshare -n sh -c 'ip link set lo up; ip route add 224.0.0.0/4 dev lo src 127.0.0.1; node selftest_js.js lsd'
 *
 * Exits 0 and prints "OK" lines when every check passes.
 */
const assert = require('assert')
const { PeerProc } = require('./harness')

const mode = process.argv[2] || 'loopback'
const ID = process.env.BO_ID || 'selftest-' + process.pid

function ok (what) { console.log('OK', what) }

async function main () {
  const t0 = Date.now()
  // B starts once A is up: an LSD announce (sent once at start, then every
  // 5 min) is lost if no other peer has joined the multicast group yet.
  const a = new PeerProc('A', { BO_ID: ID, BO_MODE: mode })
  const ra = await a.waitFor('ready')
  await new Promise((resolve) => setTimeout(resolve, 300))
  const b = new PeerProc('B', { BO_ID: ID, BO_MODE: mode })
  const rb = await b.waitFor('ready')
  assert.strictEqual(ra.identifier, ID)
  assert.ok(ra.port > 0 && rb.port > 0)
  ok(`ready A=${ra.address}:${ra.port} B=${rb.address}:${rb.port} (${Date.now() - t0} ms)`)

  const t1 = rb.at
  if (mode === 'loopback') b.send({ cmd: 'addPeer', addr: `127.0.0.1:${ra.port}` })
  const sa = await a.waitFor((e) => e.event === 'seen' && e.address === rb.address, 20000)
  const sb = await b.waitFor((e) => e.event === 'seen' && e.address === ra.address, 20000)
  ok(`both seen; A saw B ${sa.at - t1} ms, B saw A ${sb.at - t1} ms after B's ready` +
     `${mode === 'loopback' ? ' (+ addPeer)' : ' (LSD)'}`)
  await a.waitFor((e) => e.event === 'wire' && e.count === 1)
  ok('wire count 1')

  // RPC both ways.
  b.send({ cmd: 'rpc', id: 1, address: ra.address, call: 'echo', args: { x: 1, s: 'hé' } })
  let r = await b.waitFor((e) => e.event === 'rpc-result' && e.id === 1)
  assert.deepStrictEqual(r.result, { x: 1, s: 'hé', echoedBy: 'js' })
  const called = await a.waitFor((e) => e.event === 'rpc-called' && e.call === 'echo')
  assert.strictEqual(called.address, rb.address)
  assert.deepStrictEqual(called.args, { x: 1, s: 'hé' })
  a.send({ cmd: 'rpc', id: 2, address: rb.address, call: 'echo', args: { y: [1, 2] } })
  r = await a.waitFor((e) => e.event === 'rpc-result' && e.id === 2)
  assert.deepStrictEqual(r.result, { y: [1, 2], echoedBy: 'js' })
  ok('echo both ways')

  b.send({ cmd: 'rpc', id: 3, address: ra.address, call: 'whoami', args: {} })
  r = await b.waitFor((e) => e.event === 'rpc-result' && e.id === 3)
  assert.strictEqual(r.result.address, ra.address)
  const tSlow = Date.now()
  b.send({ cmd: 'rpc', id: 4, address: ra.address, call: 'slow', args: { z: true } })
  r = await b.waitFor((e) => e.event === 'rpc-result' && e.id === 4)
  assert.deepStrictEqual(r.result, { z: true })
  assert.ok(r.at - tSlow >= 200)
  ok(`whoami, slow (${r.at - tSlow} ms)`)

  b.send({ cmd: 'rpc', id: 5, address: ra.address, call: 'nope', args: {} })
  r = await b.waitFor((e) => e.event === 'rpc-result' && e.id === 5)
  assert.deepStrictEqual(r.result, { error: 'No such API call.' })
  const unk = await a.waitFor((e) => e.event === 'rpc-called' && e.call === 'nope')
  assert.strictEqual(unk.known, false)
  ok('unknown call -> {"error":"No such API call."}')

  // Messages: broadcast and addressed.
  a.send({ cmd: 'send', message: { hello: 'all' } })
  let m = await b.waitFor((e) => e.event === 'message' && e.message.hello === 'all')
  assert.strictEqual(m.address, ra.address)
  b.send({ cmd: 'send', address: ra.address, message: { hello: 'A only' } })
  m = await a.waitFor((e) => e.event === 'message' && e.message.hello === 'A only')
  assert.strictEqual(m.address, rb.address)
  ok('broadcast and addressed messages')

  // Errors are reported, not fatal.
  b.send({ cmd: 'rpc', id: 6, address: 'not-an-address', call: 'echo', args: {} })
  const err = await b.waitFor((e) => e.event === 'error' && e.id === 6)
  ok(`rpc to unseen address -> error event: ${err.message}`)

  // Closing A the way a JS peer does (bugout.close): does B get 'left'?
  const tClose = Date.now()
  const codeA = await a.close()
  assert.strictEqual(codeA, 0)
  const left = await b.waitFor((e) => e.event === 'left' && e.address === ra.address, 3000).catch(() => null)
  ok(`A closed (exit 0); B ${left ? `got left after ${left.at - tClose} ms` : 'got NO left (the x packet is lost)'}`)
  await b.waitFor((e) => e.event === 'wire' && e.count === 0, 3000)
  ok('B wire count back to 0')

  // A third peer C joins B, then sends 'x' with the leave command.
  const c = new PeerProc('C', { BO_ID: ID, BO_MODE: mode })
  const rc = await c.waitFor('ready')
  if (mode === 'loopback') c.send({ cmd: 'addPeer', addr: `127.0.0.1:${rb.port}` })
  await b.waitFor((e) => e.event === 'seen' && e.address === rc.address, 20000)
  await c.waitFor((e) => e.event === 'seen' && e.address === rb.address, 20000)
  const tLeave = Date.now()
  c.send({ cmd: 'leave' })
  const left2 = await b.waitFor((e) => e.event === 'left' && e.address === rc.address, 3000)
  ok(`C leave -> B got left after ${left2.at - tLeave} ms`)
  assert.strictEqual(await c.close(), 0)

  // stdin EOF also ends a peer cleanly.
  b.proc.stdin.end()
  assert.strictEqual(await b.exited, 0)
  ok('stdin EOF -> exit 0')
}

main().then(() => process.exit(0), (err) => { console.error('FAIL', err); process.exit(1) })
