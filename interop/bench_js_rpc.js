'use strict'
/*
 * bench_js_rpc.js - JS -> JS bugout RPC round trips over TCP loopback.
 *
 * Spawns peer.js (the server, answering `echo`), runs an in-process bugout
 * client (loopback-only options) that dials it, then measures
 *   1. sequential: one `echo` call at a time -> latency percentiles, calls/s
 *   2. pipelined: WINDOW calls in flight      -> calls/s
 *
 *   node bench_js_rpc.js [N=500] [WINDOW=16]
 *   BENCH_NODELAY=1  also sets TCP_NODELAY on both ends (BO_NODELAY=1 for peer.js)
 */
const { PeerProc } = require('./harness')
const Bugout = require('bugout')
const WebTorrent = require('webtorrent')

const N = Number(process.argv[2] || 500)
const WINDOW = Number(process.argv[3] || 16)
const NODELAY = process.env.BENCH_NODELAY === '1'
const ID = 'bench-' + process.pid

function pct (sorted, p) { return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] }

async function main () {
  const server = new PeerProc('server', { BO_ID: ID, BO_MODE: 'loopback', BO_NODELAY: NODELAY ? '1' : '0' })
  const rs = await server.waitFor('ready')

  const wt = new WebTorrent({ dht: false, lsd: false, tracker: false, webSeeds: false, utp: false })
  const client = new Bugout(ID, { wt, announce: [], torrentOpts: { announce: [] } })
  if (NODELAY) {
    client.torrent.on('wire', (wire) => {
      for (const p of Object.values(client.torrent._peers)) {
        if (p.wire === wire && p.conn && p.conn.setNoDelay) p.conn.setNoDelay(true)
      }
    })
  }
  await new Promise((resolve) => client.once('torrent', resolve))
  client.torrent.addPeer(`127.0.0.1:${rs.port}`)
  await new Promise((resolve) => client.on('seen', (a) => a === rs.address && resolve()))

  const call = (i) => new Promise((resolve) => client.rpc(rs.address, 'echo', { i }, resolve))

  // warm-up
  for (let i = 0; i < 20; i++) await call(i)

  // 1. sequential
  const lat = []
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < N; i++) {
    const s = process.hrtime.bigint()
    const r = await call(i)
    if (r.i !== i || r.echoedBy !== 'js') throw new Error('bad echo ' + JSON.stringify(r))
    lat.push(Number(process.hrtime.bigint() - s) / 1e6)
  }
  const seqSec = Number(process.hrtime.bigint() - t0) / 1e9
  lat.sort((a, b) => a - b)

  // 2. pipelined, WINDOW calls in flight
  let next = 0
  const t1 = process.hrtime.bigint()
  await Promise.all(Array.from({ length: WINDOW }, async () => {
    while (next < N) await call(next++)
  }))
  const pipeSec = Number(process.hrtime.bigint() - t1) / 1e9

  const f = (x) => x.toFixed(2)
  console.log(JSON.stringify({
    nodelay: NODELAY,
    n: N,
    sequential: {
      calls_per_s: Math.round(N / seqSec),
      median_ms: f(pct(lat, 0.5)),
      p10_ms: f(pct(lat, 0.1)),
      p90_ms: f(pct(lat, 0.9)),
      p99_ms: f(pct(lat, 0.99)),
      min_ms: f(lat[0]),
      max_ms: f(lat[lat.length - 1])
    },
    pipelined: { window: WINDOW, calls_per_s: Math.round(N / pipeSec) }
  }))

  client.close()
  wt.destroy()
  await server.close()
}

main().then(() => process.exit(0), (err) => { console.error('FAIL', err); process.exit(1) })
