#!/usr/bin/env node
'use strict'
/*
 * make-tracker-samples.js - writes testdata/tracker-samples.json: the WebSocket
 * tracker frames of two real JS bugout peers (peer.js in webrtc mode: WebTorrent
 * 1.9.7, bittorrent-tracker's client, @roamhq/wrtc) meeting through a real
 * bittorrent-tracker 9.19.0 server, as the server reads and writes them.
 *
 *   interop/make-testdata.sh [OUT_DIR]     (as root; it runs this in `unshare -n`)
 *
 * Loopback only: the tracker listens on 127.0.0.1, ICE has no STUN/TURN server
 * (iceServers: []), and the script, like peer.js, refuses to run outside a
 * network namespace whose interfaces are all loopback. It also refuses while lo
 * has IPv6, which would add ::1 candidates on some machines and not on others.
 *
 * The run: peer A starts and announces (five offers, nobody to give them to);
 * once the tracker has answered it, peer B starts and announces; the tracker
 * relays B's first offer to A, A answers, the tracker relays the answer to B,
 * and the two bugouts must then see each other over the WebRTC data channel
 * (so the frames are those of a connection that works). The samples end with
 * that relayed answer.
 *
 * What would differ between runs, and how it is pinned down:
 *   - JS randomness (peer ids, offer ids, simple-peer channel names, bugout's
 *     keys): each peer is a process of its own whose crypto.randomBytes and
 *     Math.random are labelled sha512 draws (interop/deterministic.js, streams
 *     "anchor-a" and "anchor-b");
 *   - the order of the offers in an announce (bittorrent-tracker lists them as
 *     libwebrtc finishes gathering): put back in the order the offers were made;
 *   - the random parts of each SDP, made by libwebrtc: the o= session id, the
 *     ice-ufrag, the ice-pwd and the DTLS fingerprint are replaced by stand-ins
 *     drawn from sha512("anchor-sdp-<kind>-<k>") in order of first appearance,
 *     and the ports are renumbered 40000, 40001, ... candidate by candidate (the
 *     m= line keeps its candidate's number); an SDP and its relayed copy get the
 *     same stand-ins. Host TCP candidates are left out of the recorded SDPs:
 *     how many libwebrtc lists (5, 4, 3, 2, 1 over the five offers, mostly)
 *     changed from run to run on a loaded machine. The frames are then written
 *     again with JSON.stringify, which gives the text the JS code sends for the
 *     same object;
 *   - timing: frames carry their index in the sequence, not a time.
 */
const path = require('path')

if (process.argv[2] === '--peer') {
  // A child: one JS peer with its own deterministic randomness.
  const det = require('./deterministic')
  det.install(`anchor-${process.argv[3]}`)
  keepOfferOrder()
  require('./peer.js')
  return
}

const { spawn } = require('child_process')
const crypto = require('crypto')
const fs = require('fs')
const os = require('os')
const readline = require('readline')
const { Server } = require('bittorrent-tracker')

const IDENT = 'demoCHannel0'
const OUT_DIR = path.resolve(process.argv[2] || path.join(__dirname, '..', 'testdata'))
const KINDS = {
  announceOffers: 'client->tracker announce (with offers)',
  response: 'tracker->client announce response',
  relayedOffer: 'tracker->other client: relayed offer',
  answer: 'client->tracker answer (to_peer_id)',
  relayedAnswer: 'tracker->offerer: relayed answer'
}

/** bittorrent-tracker's client as WebTorrent resolves it: offers in the order made. */
function keepOfferOrder () {
  const wtDir = path.dirname(require.resolve('webtorrent', { paths: [path.dirname(require.resolve('bugout'))] }))
  const discovery = path.dirname(require.resolve('torrent-discovery', { paths: [wtDir] }))
  const trackerDir = path.dirname(require.resolve('bittorrent-tracker/package.json', { paths: [discovery] }))
  const WebSocketTracker = require(path.join(trackerDir, 'lib/client/websocket-tracker.js'))
  const generate = WebSocketTracker.prototype._generateOffers
  WebSocketTracker.prototype._generateOffers = function (numwant, cb) {
    const before = new Set(Object.keys(this.peers))
    generate.call(this, numwant, (offers) => {
      const made = Object.keys(this.peers).filter((id) => !before.has(id))
      const rank = (o) => made.indexOf(Buffer.from(o.offer_id, 'binary').toString('hex'))
      cb(offers.slice().sort((a, b) => rank(a) - rank(b)))
    })
  }
}

function onlyLoopback () {
  return Object.values(os.networkInterfaces()).every((addrs) => addrs.every((a) => a.internal))
}

/** IPv6 on lo would add ::1 candidates on some machines and not on others. */
function noIpv6 () {
  return Object.values(os.networkInterfaces()).every((addrs) => addrs.every((a) => a.family === 'IPv4'))
}

// ---------------------------------------------------------------- SDP stand-ins
const draw = (label, n) => crypto.createHash('sha512').update(label).digest().subarray(0, n)
const ICE_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
const standIns = {}
function standIn (kind, value, make) {
  const table = standIns[kind] || (standIns[kind] = new Map())
  if (!table.has(value)) table.set(value, make(table.size))
  return table.get(value)
}
const iceString = (kind, value) => standIn(kind, value, (k) =>
  Array.from(draw(`anchor-sdp-${kind}-${k}`, value.length), (b) => ICE_CHARS[b % 64]).join(''))
const sessionId = (value) => standIn('session', value, (k) =>
  (draw(`anchor-sdp-session-${k}`, 8).readBigUInt64BE(0) >> 1n).toString())
let nextPort = 40000 // ports: numbered in order of appearance, candidate by candidate
const fingerprint = (value) => standIn('fingerprint', value, (k) =>
  Array.from(draw(`anchor-sdp-fingerprint-${k}`, 32), (b) => b.toString(16).toUpperCase().padStart(2, '0')).join(':'))

const normalised = new Map() // original SDP -> stand-in SDP (a relayed copy stays equal)
function normaliseSdp (sdp) {
  if (!normalised.has(sdp)) normalised.set(sdp, standInSdp(sdp))
  return normalised.get(sdp)
}

function standInSdp (sdp) {
  const CANDIDATE = /^a=candidate:(\S+) (\d+) (\S+) (\d+) (\S+) (\d+) typ (.*)$/
  // host TCP candidates: how many libwebrtc lists depends on timing
  const lines = sdp.split('\r\n').filter((line) => {
    const c = line.match(CANDIDATE)
    return !(c && c[3].toLowerCase() === 'tcp')
  })
  // each candidate gets a port of its own (two sockets may share a number)
  const ports = lines.map((line) => CANDIDATE.test(line) ? nextPort++ : null)
  const cLine = lines.find((line) => line.startsWith('c=IN '))
  const defaultIp = cLine ? cLine.split(' ')[2] : null
  return lines.map((line, i) => {
    let m
    if ((m = line.match(CANDIDATE))) {
      return `a=candidate:${m[1]} ${m[2]} ${m[3]} ${m[4]} ${m[5]} ${ports[i]} typ ${m[7]}`
    } else if ((m = line.match(/^o=(\S+) (\d+) (.*)$/))) {
      return `o=${m[1]} ${sessionId(m[2])} ${m[3]}`
    } else if ((m = line.match(/^m=(\S+) (\d+) (.*)$/))) {
      // the default candidate: the first UDP one on the c= address with this port
      const j = lines.findIndex((l) => {
        const c = l.match(CANDIDATE)
        return c && c[3].toLowerCase() === 'udp' && c[5] === defaultIp && c[6] === m[2]
      })
      return `m=${m[1]} ${j >= 0 ? ports[j] : nextPort++} ${m[3]}`
    } else if ((m = line.match(/^a=ice-ufrag:(.*)$/))) {
      return `a=ice-ufrag:${iceString('ufrag', m[1])}`
    } else if ((m = line.match(/^a=ice-pwd:(.*)$/))) {
      return `a=ice-pwd:${iceString('pwd', m[1])}`
    } else if ((m = line.match(/^a=fingerprint:(\S+) (.*)$/))) {
      return `a=fingerprint:${m[1]} ${fingerprint(m[2])}`
    }
    return line
  }).join('\r\n')
}

function normaliseFrame (frame) {
  const copy = JSON.parse(JSON.stringify(frame))
  for (const holder of [copy, ...(copy.offers || [])]) {
    for (const key of ['offer', 'answer']) {
      if (holder[key] && typeof holder[key].sdp === 'string') holder[key].sdp = normaliseSdp(holder[key].sdp)
    }
  }
  return copy
}

// ---------------------------------------------------------------- the tracker tap
const frames = [] // {dir, ws_conn, frame}
let changed = () => {}

function tapSocket (socket, conn) {
  const on = socket.on
  socket.on = function (event, listener) {
    if (event !== 'message') return on.call(this, event, listener)
    return on.call(this, event, (data, ...rest) => {
      record('in', conn, data.toString())
      return listener(data, ...rest)
    })
  }
  const send = socket.send
  socket.send = function (text, ...rest) {
    record('out', conn, String(text))
    return send.call(this, text, ...rest)
  }
}

function record (dir, conn, text) {
  let frame
  try { frame = JSON.parse(text) } catch (err) { frame = { unparsed: text } }
  frames.push({ dir, ws_conn: conn, frame })
  changed()
}

function kindOf ({ dir, frame }) {
  if (dir === 'in') {
    if (frame.answer) return KINDS.answer
    if (frame.offers) return KINDS.announceOffers
    return 'client->tracker ' + (frame.action || 'frame')
  }
  if (frame.offer) return KINDS.relayedOffer
  if (frame.answer) return KINDS.relayedAnswer
  if ('interval' in frame) return KINDS.response
  return 'tracker->client ' + (frame.action || 'frame')
}

const BINARY_KEYS = ['info_hash', 'peer_id', 'to_peer_id', 'offer_id']
function structure (value, key) {
  if (BINARY_KEYS.includes(key)) return '<20-byte binary string (latin1)>'
  if (key === 'sdp') return `<SDP ${value.length} chars>`
  if (Array.isArray(value)) return value.length > 1 ? [structure(value[0]), `... x${value.length}`] : value.map((v) => structure(v))
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, structure(v, k)]))
  }
  return value
}

function hexFields (frame) {
  const out = {}
  for (const key of BINARY_KEYS) {
    if (key !== 'offer_id' && typeof frame[key] === 'string') out[`${key}__hex`] = Buffer.from(frame[key], 'latin1').toString('hex')
  }
  return out
}

async function until (predicate, what, ms = 60000) {
  const deadline = Date.now() + ms
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; frames: ${frames.map(kindOf).join(', ')}`)
    await new Promise((resolve) => { changed = resolve; setTimeout(resolve, 100) })
  }
}

// ---------------------------------------------------------------- peers
function startPeer (name, url) {
  const proc = spawn(process.execPath, [__filename, '--peer', name], {
    env: Object.assign({}, process.env, { BO_ID: IDENT, BO_MODE: 'webrtc', BO_TRACKER: url }),
    stdio: ['pipe', 'pipe', 'inherit']
  })
  const peer = { name, proc, events: [] }
  readline.createInterface({ input: proc.stdout }).on('line', (line) => {
    try { peer.events.push(JSON.parse(line)) } catch (err) { return }
    changed()
  })
  return peer
}

async function main () {
  if (!onlyLoopback()) {
    console.error('refused: run inside `unshare -n` (a non-loopback interface is present); see interop/make-testdata.sh')
    process.exit(2)
  }
  if (!noIpv6()) {
    console.error('refused: IPv6 is up on lo (libwebrtc would add ::1 candidates); see interop/make-testdata.sh')
    process.exit(2)
  }
  const server = new Server({ http: false, udp: false, ws: true, stats: false })
  let conns = 0
  const attach = server.onWebSocketConnection
  server.onWebSocketConnection = function (socket, opts) {
    tapSocket(socket, ++conns)
    return attach.call(this, socket, opts)
  }
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const url = `ws://127.0.0.1:${server.ws.address().port}`

  const a = startPeer('a', url)
  await until(() => frames.some((f) => f.ws_conn === 1 && kindOf(f) === KINDS.response), 'the answer to A\'s announce')
  const b = startPeer('b', url)
  await until(() => frames.some((f) => kindOf(f) === KINDS.relayedAnswer), 'the relayed answer')
  const end = frames.findIndex((f) => kindOf(f) === KINDS.relayedAnswer) + 1
  const seen = (p, q) => p.events.some((e) => e.event === 'seen' && e.address === (q.events.find((r) => r.event === 'ready') || {}).address)
  await until(() => seen(a, b) && seen(b, a), 'A and B to see each other over WebRTC')

  const sequence = frames.slice(0, end).map((f, index) => {
    const frame = normaliseFrame(f.frame)
    const text = JSON.stringify(frame)
    return { index, dir: f.dir, ws_conn: f.ws_conn, kind: kindOf(f), bytes: Buffer.byteLength(text), structure: structure(frame), frame, text }
  })
  const first = (kind, conn) => sequence.find((s) => s.kind === kind && (!conn || s.ws_conn === conn))
  const examples = {
    [KINDS.announceOffers]: first(KINDS.announceOffers, 1),
    [KINDS.response]: first(KINDS.response, 1),
    [KINDS.relayedOffer]: first(KINDS.relayedOffer),
    [KINDS.answer]: first(KINDS.answer),
    [KINDS.relayedAnswer]: first(KINDS.relayedAnswer)
  }
  const out = {
    note: 'WebSocket tracker frames as a bittorrent-tracker 9.19.0 server on ws://127.0.0.1 read ("in") and wrote ("out") them, between two JS bugout peers (WebTorrent 1.9.7, @roamhq/wrtc) made deterministic by interop/make-tracker-samples.js; the random parts of the SDPs are replaced by stand-ins and host TCP candidates are left out (see that script). info_hash, peer_id and offer_id are 20-character latin1 "binary" strings in the JSON; hex copies in *__hex.',
    sequence: sequence.map(({ frame, text, ...rest }) => rest),
    full_examples: Object.fromEntries(Object.entries(examples).map(([kind, s]) => {
      if (!s) throw new Error(`no ${kind} frame`)
      return [kind, { raw_json_text: s.text, hex_fields: hexFields(s.frame) }]
    }))
  }
  fs.mkdirSync(OUT_DIR, { recursive: true })
  fs.writeFileSync(path.join(OUT_DIR, 'tracker-samples.json'), JSON.stringify(out, null, 1) + '\n')

  for (const p of [a, b]) p.proc.stdin.end()
  await Promise.all([a, b].map((p) => new Promise((resolve) => p.proc.on('exit', resolve))))
  server.close()
  setTimeout(() => process.exit(0), 500).unref()
}

main().catch((err) => { console.error(err); process.exit(1) })
