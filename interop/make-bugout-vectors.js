#!/usr/bin/env node
'use strict'
/*
 * make-bugout-vectors.js - writes testdata/bugout-vectors.json: the bytes that the
 * real npm bugout 0.0.13 (with the tweetnacl, bencode, bs58, bs58check, ripemd160
 * and WebTorrent 1.9.7 it resolves) puts on the BitTorrent wire, made
 * deterministic so that a run gives the same file every time.
 *
 *   interop/make-testdata.sh [OUT_DIR]     (as root; it runs this, then the
 *                                          tracker samples, in `unshare -n`)
 *
 * Like the JS peers it runs a DHT node (BEP 5, no bootstrap nodes), so it refuses
 * to start outside a network namespace whose interfaces are all loopback.
 *
 * How the run is made deterministic (interop/deterministic.js):
 *   - every tweetnacl draw is sha512("anchor-prng-<k>")[:n], k counting from 0 at
 *     the handshakes and from 100 at the RPC; the two session (box) keys are
 *     fixed draws (0x40..0x5f for the master, 0x60..0x7f for the worker);
 *   - the bugout seeds are fixed (materials 0x00..0x1f and 0x20..0x3f);
 *   - `new Date()` returns 1700000000000 (bugout's packet time `t`);
 *   - WebTorrent's own randomness (peer ids, DHT node ids) and Math.random come
 *     from labelled sha512 draws too;
 *   - the two peers are joined by an in-memory stream pair (as WebTorrent joins a
 *     WebRTC peer: both send their handshake at once), in one process, so no
 *     kernel scheduling decides the order of events; the DHT ports are fixed.
 * Nothing here is copied from a capture: every byte is made by the JS code now.
 */
const det = require('./deterministic')
det.install('anchor')
const T_MS = 1700000000000
det.fixClock(T_MS)

const fs = require('fs')
const os = require('os')
const path = require('path')
const { Duplex } = require('stream')

const bugoutDir = path.dirname(require.resolve('bugout'))
const fromBugout = (name) => require(require.resolve(name, { paths: [bugoutDir] }))
const Bugout = require('bugout')
const nacl = fromBugout('tweetnacl')
const bencode = fromBugout('bencode')
const bs58 = fromBugout('bs58')
const bs58check = fromBugout('bs58check')
const RIPEMD160 = fromBugout('ripemd160')
const WebTorrent = fromBugout('webtorrent')
const Wire = require(require.resolve('bittorrent-protocol', { paths: [path.dirname(require.resolve('webtorrent', { paths: [bugoutDir] }))] }))
det.installNacl(nacl)

const IDENT = 'demoCHannel0'
const OUT_DIR = path.resolve(process.argv[2] || path.join(__dirname, '..', 'testdata'))
const ROLES = {
  master: { material: range(0x00, 32), ek: range(0x40, 32), dhtPort: 16881 },
  worker: { material: range(0x20, 32), ek: range(0x60, 32), dhtPort: 16882 }
}
// Seeds that only go through the key and address derivation: all zeros, all
// ones, and sha256("queue-xec").
const EXTRA_MATERIALS = ['00'.repeat(32), 'ff'.repeat(32), sha256hex('queue-xec')]

function range (start, n) { return Buffer.from(Array.from({ length: n }, (_, i) => start + i)) }
function sha256hex (text) { return require('crypto').createHash('sha256').update(text).digest('hex') }
const hex = (b) => Buffer.from(b).toString('hex')
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function onlyLoopback () {
  return Object.values(os.networkInterfaces()).every((addrs) => addrs.every((a) => a.internal))
}

/** bugout's module constants, read from its source (they are not exported). */
function bugoutConstants () {
  const src = fs.readFileSync(require.resolve('bugout'), 'utf8')
  const get = (name) => {
    const m = src.match(new RegExp(`var ${name} = ([^;]+);`))
    if (!m) throw new Error(`bugout source has no ${name}`)
    return m[1].trim()
  }
  return {
    EXT: JSON.parse(get('EXT')),
    SEEDPREFIX_hex: JSON.parse(get('SEEDPREFIX')),
    ADDRESSPREFIX_hex: JSON.parse(get('ADDRESSPREFIX')),
    PEERTIMEOUT_ms: get('PEERTIMEOUT').split('*').reduce((a, b) => a * Number(b), 1)
  }
}

// Every object bugout bencodes as a packet, in the key order bugout built it.
const built = []
const realEncode = bencode.encode
bencode.encode = function encode (obj, ...rest) {
  if (obj && typeof obj === 'object' && 't' in obj && 'y' in obj) built.push(Object.keys(obj))
  return realEncode.call(this, obj, ...rest)
}

// ---------------------------------------------------------------- the wire tap
const tap = [] // {from, to, data}
let lastChunk = Date.now()

/** Two in-memory streams joined back to back; every chunk written is logged. */
function streamPair (nameA, nameB) {
  let a = null
  let b = null
  const make = (me, other, peer) => new Duplex({
    read () {},
    write (chunk, _enc, cb) {
      tap.push({ from: me, to: other, data: Buffer.from(chunk) })
      lastChunk = Date.now()
      peer().push(chunk)
      cb()
    }
  })
  a = make(nameA, nameB, () => b)
  b = make(nameB, nameA, () => a)
  a.id = `mem-${nameA}`
  b.id = `mem-${nameB}`
  a.connected = b.connected = true
  return [a, b]
}

/** Wait until nothing has moved on the wire for `quietMs`. */
async function quiet (quietMs = 300) {
  await sleep(quietMs)
  while (Date.now() - lastChunk < quietMs) await sleep(50)
}

/** Split each direction's byte stream into BitTorrent messages, in the order written. */
function messages () {
  const buffers = {}
  const out = []
  tap.forEach(({ from, to, data }, at) => {
    const key = `${from}>${to}`
    buffers[key] = Buffer.concat([buffers[key] || Buffer.alloc(0), data])
    for (;;) {
      const buf = buffers[key]
      const first = !out.some((m) => m.key === key)
      if (first) {
        if (buf.length < 68) break
        out.push({ key, from, to, at, type: 'handshake', raw: buf.subarray(0, 68) })
        buffers[key] = buf.subarray(68)
        continue
      }
      if (buf.length < 4) break
      const len = buf.readUInt32BE(0)
      if (buf.length < 4 + len) break
      out.push({ key, from, to, at, type: messageType(buf.subarray(4, 4 + len)), raw: buf.subarray(0, 4 + len) })
      buffers[key] = buf.subarray(4 + len)
    }
  })
  return out
}

const MESSAGE_NAMES = { 0: 'choke', 1: 'unchoke', 2: 'interested', 3: 'not_interested', 4: 'have', 5: 'bitfield', 6: 'request', 7: 'piece', 8: 'cancel', 9: 'port', 13: 'suggest', 14: 'have_all', 15: 'have_none', 16: 'reject', 17: 'allowed_fast', 20: 'extended' }
function messageType (body) {
  if (!body.length) return 'keep_alive'
  return MESSAGE_NAMES[body[0]] || `id_${body[0]}`
}

// ---------------------------------------------------------------- decoding
function bufValue (key, value) {
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    return (key === 'n' || key === 'rn') ? { hex: hex(value) } : Buffer.from(value).toString()
  }
  return value
}

function packetFields (p) {
  const out = {}
  for (const [k, v] of Object.entries(bencode.decode(p))) out[k] = bufValue(k, v)
  return out
}

/** What the receiving bugout finds in a bo_channel payload. */
function decodeFor (payload, receiver) {
  const outer = bencode.decode(payload)
  if (outer.e && outer.n && outer.ek) {
    const opened = nacl.box.open(outer.e, outer.n, bs58.decode(outer.ek.toString()), receiver.keyPairEncrypt.secretKey)
    const result = {
      kind: 'encrypted',
      envelope: { e_len: outer.e.length, ek: outer.ek.toString(), n: hex(outer.n) },
      decrypts_for_receiver: !!opened
    }
    if (opened) {
      const signed = bencode.decode(Buffer.from(opened))
      Object.assign(result, { signed_p_hex: hex(signed.p), s_hex: hex(signed.s), packet: packetFields(signed.p) })
    }
    return result
  }
  return { kind: 'plain', signed_p_hex: hex(outer.p), s_hex: hex(outer.s), packet: packetFields(outer.p) }
}

// ---------------------------------------------------------------- peers
const allEvents = [] // [role, event, ...arguments] of both bugouts, in order
function makePeer (role) {
  const spec = ROLES[role]
  const wt = new WebTorrent({
    dht: { bootstrap: false }, // a DHT node as JS peers run, with no one to ask
    dhtPort: spec.dhtPort,
    tracker: false,
    lsd: false,
    utp: false,
    webSeeds: false
  })
  det.naclScript([spec.ek]) // nacl.box.keyPair() in the constructor draws these
  const bugout = new Bugout(IDENT, { wt, seed: Bugout.encodeseed(spec.material), announce: [], torrentOpts: { announce: [] } })
  const emit = bugout.emit
  bugout.emit = function (name, ...args) {
    if (['seen', 'ping', 'message', 'rpc', 'rpc-response', 'left', 'server'].includes(name)) {
      allEvents.push([role, name, ...args.map((a) => typeof a === 'string' ? a : JSON.stringify(a))])
    }
    return emit.call(this, name, ...args)
  }
  const ready = new Promise((resolve) => {
    const check = () => {
      if (wt.listening && wt.dht && wt.dht.listening && bugout.torrent.ready) resolve()
      else setTimeout(check, 20)
    }
    check()
  })
  return { role, wt, bugout, ready }
}

function keysOf (peer, spec, ext) {
  const b = peer.bugout
  const sent = bencode.decode(ext.raw.subarray(6))
  const digest = Buffer.from(nacl.hash(b.keyPair.publicKey))
  return {
    seed_material_hex: hex(spec.material),
    seed_bs58check: b.seed,
    seed_decoded_hex: hex(bs58check.decode(b.seed)),
    sign_public_key_hex: hex(b.keyPair.publicKey),
    sign_secret_key_hex: hex(b.keyPair.secretKey),
    pk_bs58: b.pk,
    address: b.address(),
    address_payload_hex: hex(bs58check.decode(b.address())),
    sha512_of_pk_hex: hex(digest),
    ripemd160_of_sha512_hex: hex(new RIPEMD160().update(digest).digest()),
    ek_secret_key_hex: hex(b.keyPairEncrypt.secretKey),
    ek_public_key_hex: hex(b.keyPairEncrypt.publicKey),
    ek_bs58: b.ek,
    // the fields bugout adds to WebTorrent's extended handshake, as sent
    bugout_extended_handshake_fields: Object.fromEntries(['ek', 'id', 'pk'].map((k) => [k, sent[k].toString()])),
    full_extended_handshake_bencoded_hex: hex(ext.raw.subarray(6)),
    full_extended_handshake_message_hex: hex(ext.raw)
  }
}

function bareHandshake (infoHash, peerId, dht) {
  const wire = new Wire()
  const chunks = []
  wire.on('data', (c) => chunks.push(c))
  wire.handshake(infoHash, peerId, { dht, fast: true })
  return new Promise((resolve) => setImmediate(() => { wire.destroy(); resolve(Buffer.concat(chunks)) }))
}

function captured (msg, index) {
  const entry = { seq: index, dir: `${msg.from}->${msg.to}`, type: msg.type, hex: hex(msg.raw) }
  if (msg.type === 'handshake') entry.reserved_hex = hex(msg.raw.subarray(20, 28))
  if (msg.type === 'extended' && msg.raw[5] === 0) {
    const dict = bencode.decode(msg.raw.subarray(6))
    entry.dict = JSON.parse(JSON.stringify(dict, (k, v) => (v && v.type === 'Buffer') ? Buffer.from(v.data).toString() : v))
    entry.dict_bencoded = msg.raw.subarray(6).toString('latin1')
  }
  return entry
}

// ---------------------------------------------------------------- the run
async function main () {
  if (!onlyLoopback()) {
    console.error('refused: run inside `unshare -n` (a non-loopback interface is present); see interop/make-testdata.sh')
    process.exit(2)
  }
  const constants = bugoutConstants()
  const peers = { master: makePeer('master'), worker: makePeer('worker') }
  await Promise.all(Object.values(peers).map((p) => p.ready))
  const M = peers.master.bugout
  const W = peers.worker.bugout
  // as the queue-xec master (src/index.js registerRPC) answers it
  M.register('isMaster', (address, args, reply) => { args.isMaster = 'yes'; reply(args) })

  const steps = []
  const mark = (step) => steps.push({ step, at: tap.length })

  // 1. connect; bugout pings on each extended handshake and echoes what it sees
  mark('after-extended-handshakes')
  det.naclCounter(0)
  det.naclDraws()
  const [mEnd, wEnd] = streamPair('master', 'worker')
  M.torrent.addPeer(mEnd)
  W.torrent.addPeer(wEnd)
  await quiet()
  const handshakeDraws = det.naclDraws()

  // 2. the worker asks the master isMaster
  mark('rpc-isMaster')
  det.naclCounter(100)
  let callbackResult = null
  W.rpc(M.address(), 'isMaster', {}, (result) => { callbackResult = result })
  const callDraws = det.naclDraws()
  const callKeys = built[built.length - 1]
  await quiet()
  if (!callbackResult) throw new Error('no answer to isMaster')

  const msgs = messages()
  const ext = (role) => msgs.find((m) => m.from === role && m.type === 'extended' && m.raw[5] === 0)
  // the frames of the bugout extension, with the step they were written in
  const boId = (to) => bencode.decode(ext(to).raw.subarray(6)).m[constants.EXT]
  const exchange = []
  for (const m of msgs) {
    if (m.type !== 'extended' || m.raw[5] !== boId(m.to)) continue
    const payload = m.raw.subarray(6)
    const step = steps.filter((s) => s.at <= m.at).pop().step
    exchange.push({
      step,
      from: m.from,
      to: m.to,
      payload_hex: hex(payload),
      framed_hex: hex(m.raw),
      seen_hash_hex: hex(nacl.hash(payload).slice(16)),
      decoded_by_receiver: decodeFor(payload, peers[m.to].bugout)
    })
  }

  const call = exchange.find((e) => e.step === 'rpc-isMaster' && e.from === 'worker')
  const response = exchange.find((e) => e.step === 'rpc-isMaster' && e.from === 'master' &&
    e.decoded_by_receiver.packet && e.decoded_by_receiver.packet.y === 'rr')
  if (!call.decoded_by_receiver.decrypts_for_receiver) throw new Error('the master cannot open the call')
  const envelope = bencode.decode(Buffer.from(call.payload_hex, 'hex'))
  const signed = Buffer.from(nacl.box.open(envelope.e, envelope.n, bs58.decode(envelope.ek.toString()), M.keyPairEncrypt.secretKey))
  const inner = bencode.decode(signed)
  const pFields = packetFields(inner.p)
  const uses = { [pFields.rn.hex]: 'rn (callnonce)', [pFields.n.hex]: 'n (packet nonce)', [hex(envelope.n)]: 'box nonce' }

  const infoHash = peers.master.bugout.torrent.infoHash
  // the info dictionary, as ut_metadata serves it from the torrent file
  const info = bencode.decode(peers.master.bugout.torrent.metadata).info
  const infoBuffer = realEncode(info)
  if (require('crypto').createHash('sha1').update(infoBuffer).digest('hex') !== infoHash) throw new Error('info hash')
  const exampleId = Buffer.from('-WW0109-AAAAAAAAAAAA')
  const withDht = await bareHandshake(infoHash, exampleId, true)
  const withoutDht = await bareHandshake(infoHash, exampleId, false)
  const peerIdPrefix = Buffer.from(peers.master.wt.peerId, 'hex').subarray(0, 8).toString()

  const extraSeeds = EXTRA_MATERIALS.map((material) => {
    const seed = Bugout.encodeseed(Buffer.from(material, 'hex'))
    const keyPair = nacl.sign.keyPair.fromSeed(Uint8Array.from(bs58check.decode(seed)).slice(2))
    return {
      seed_material_hex: material,
      seed_bs58check: seed,
      pk_bs58: bs58.encode(Buffer.from(keyPair.publicKey)),
      sign_public_key_hex: hex(keyPair.publicKey),
      address: Bugout.address(keyPair.publicKey)
    }
  })

  const out = {
    about: 'Wire vectors of npm bugout 0.0.13 (WebTorrent 1.9.7, tweetnacl, bencode, bs58check), made by interop/make-bugout-vectors.js running that code with fixed seeds, a fixed clock and a seeded PRNG. *_hex fields are lowercase hex. See PROTOCOL.md.',
    identifier: IDENT,
    constants: Object.assign(constants, { bo_channel_ext_id_used_in_frames: boId('master') }),
    recipes: {
      seed: 'bs58check(0x49 0x0a || 32 bytes of material); bs58check = base58 (bitcoin alphabet) of payload || sha256(sha256(payload))[0:4]',
      sign_keypair: 'Ed25519 key pair whose seed is the 32 bytes of material (nacl.sign.keyPair.fromSeed)',
      pk: 'base58 of the 32-byte Ed25519 public key, no checksum',
      address: 'bs58check(0x55 || ripemd160(sha512(Ed25519 public key)))',
      ek: 'base58 of the Curve25519 public key of a nacl.box key pair that bugout makes anew in every process',
      packet: 'p = bencode of {t: ms since 1970, i: identifier, pk, ek, n: 8 random bytes, plus the type fields}; sent as bencode({p, s: Ed25519 detached signature of p}); bencode sorts the keys',
      rpc_call_fields: 'y = "r", c = call name, a = JSON text of the arguments, rn = 8 random bytes naming the call',
      rpc_response_fields: 'y = "rr", rn = the call\'s 8 bytes, rr = JSON text of the result',
      other_types: 'y = "m" with v = JSON text (a message), y = "p" (ping), y = "x" (leaving)',
      envelope: 'to one peer: bencode({n: 24 random bytes, ek: the sender\'s ek, e: nacl.box(signed packet, n, receiver ek, sender\'s box secret)}); e is the 16-byte Poly1305 tag followed by the ciphertext',
      framing: 'BEP 10 extended message: uint32be length || 20 || the id the receiver gave "bo_channel" in its extended handshake || payload',
      dedupe_hash: 'hex of sha512(payload)[16:64] (bugout: nacl.hash(message).slice(16)); a payload seen before is neither handled nor relayed again',
      receive_checks: 'the Ed25519 signature of p verifies under base58decode(p.pk); p.i equals the identifier; p.t + 300000 > the receiver\'s clock'
    },
    fixed: {
      t_ms: T_MS,
      prng: 'tweetnacl PRNG replaced: draw #k of n bytes = sha512(utf8("anchor-prng-<k>"))[0:n]; k starts at 0 for the handshake phase and at 100 for the RPC; the box keys are the fixed ek_secret_key_hex'
    },
    torrent: {
      info_dict: { length: info.length, name: info.name.toString(), 'piece length': info['piece length'], pieces_hex: hex(info.pieces) },
      info_bencoded_hex: hex(infoBuffer),
      info_bencoded_len: infoBuffer.length,
      infoHash_hex: infoHash,
      recipe: 'bugout seeds one file named and filled with the identifier: info = {length: utf8 length of the identifier, name: identifier, piece length: 16384, pieces: sha1(identifier)}; infoHash = sha1(bencode(info)); metadata_size = length of bencode(info)'
    },
    bittorrent: {
      handshake_template: '19 "BitTorrent protocol" | 8 reserved bytes | 20-byte info hash | 20-byte peer id (68 bytes)',
      reserved_with_dht_hex: hex(withDht.subarray(20, 28)),
      reserved_without_dht_hex: hex(withoutDht.subarray(20, 28)),
      reserved_bits: 'byte 5 |= 0x10 (BEP 10 extension protocol); byte 7 |= 0x04 (BEP 6 fast extension, WebTorrent always sets it); byte 7 |= 0x01 (BEP 5 DHT, when the client runs a DHT node)',
      example_handshake_with_dht_hex: hex(withDht),
      example_handshake_without_dht_hex: hex(withoutDht),
      peer_id_format: `"${peerIdPrefix}" + base64 of 9 random bytes (12 characters)`,
      captured_first_messages: msgs.slice(0, 10).map(captured)
    },
    keys: {
      master: keysOf(peers.master, ROLES.master, ext('master')),
      worker: keysOf(peers.worker, ROLES.worker, ext('worker'))
    },
    extra_seed_vectors: extraSeeds,
    rpc_isMaster: {
      direction: 'worker -> master',
      random_draws_in_order: callDraws.map((d) => ({ use: uses[d.hex], label: d.label, n: d.n, hex: d.hex })),
      inner_packet_fields: Object.fromEntries(callKeys.map((k) => [k, pFields[k]])),
      p_bencoded_hex: hex(inner.p),
      p_bencoded_text: inner.p.toString('latin1'),
      signature_hex: hex(inner.s),
      signed_packet_hex: hex(signed),
      envelope_hex: call.payload_hex,
      envelope_fields: { n_hex: hex(envelope.n), ek: envelope.ek.toString(), e_hex: hex(envelope.e), e_len: envelope.e.length, plaintext_len: signed.length },
      framed_message_hex: call.framed_hex,
      seen_hash_hex: call.seen_hash_hex,
      response: response,
      callback_result: callbackResult
    },
    exchange_log: exchange,
    events: allEvents,
    handshake_phase_random_draws: handshakeDraws.map((d) => ({ label: d.label, n: d.n, hex: d.hex }))
  }

  fs.mkdirSync(OUT_DIR, { recursive: true })
  fs.writeFileSync(path.join(OUT_DIR, 'bugout-vectors.json'), JSON.stringify(out, null, 1) + '\n')
  for (const p of Object.values(peers)) p.wt.destroy()
  setTimeout(() => process.exit(0), 200).unref()
}

main().catch((err) => { console.error(err); process.exit(1) })
