'use strict'
/*
 * deterministic.js - take the chance and the clock out of a Node process, so that
 * the real JS code (bugout, tweetnacl, WebTorrent, bittorrent-tracker) writes the
 * same bytes at every run. Require it before anything else: packages such as
 * `randombytes` keep a reference to crypto.randomBytes when they load.
 *
 * Every random byte comes from a labelled draw: draw k of n bytes is
 * sha512(utf8(label + k)), the first n bytes (longer draws chain more blocks).
 *   - tweetnacl (bugout's keys and nonces): labels "anchor-prng-<k>", through
 *     nacl.setPRNG; `naclCounter(k)` moves k, `naclScript(buffers)` queues fixed
 *     draws to hand out first (the session keys of the vectors).
 *   - crypto.randomBytes / randomFillSync / getRandomValues (peer ids, offer ids,
 *     simple-peer channel names, DHT node ids): "<stream>-node-<k>".
 *   - Math.random: "<stream>-math-<k>" (53 bits of the draw).
 * `fixClock(ms)` makes `new Date()` (no arguments) return that time; Date.now
 * and the timers keep the real clock, so time-outs still work.
 */
const crypto = require('crypto')

const realRandomBytes = crypto.randomBytes

function draw (label, n) {
  const blocks = []
  for (let i = 0, got = 0; got < n; i++) {
    const block = crypto.createHash('sha512').update(i ? `${label}/${i}` : label).digest()
    blocks.push(block)
    got += block.length
  }
  return Buffer.concat(blocks).subarray(0, n)
}

const state = { stream: 'anchor', node: 0, math: 0, nacl: 0, script: [], log: [] }

function nodeBytes (n) {
  return draw(`${state.stream}-node-${state.node++}`, n)
}

/** Route every Node source of randomness through the labelled draws. */
function install (stream = 'anchor') {
  state.stream = stream
  crypto.randomBytes = function randomBytes (n, cb) {
    const out = nodeBytes(n)
    if (typeof cb === 'function') {
      process.nextTick(cb, null, out)
      return undefined
    }
    return out
  }
  crypto.randomFillSync = function randomFillSync (buf, offset = 0, size) {
    const view = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength)
    const n = size === undefined ? view.length - offset : size
    nodeBytes(n).copy(view, offset)
    return buf
  }
  const fill = (arr) => { crypto.randomFillSync(arr); return arr }
  // crypto.getRandomValues (the module's) reads webcrypto's at call time
  if (crypto.webcrypto) Object.getPrototypeOf(crypto.webcrypto).getRandomValues = fill
  Math.random = function random () {
    const b = draw(`${state.stream}-math-${state.math++}`, 8)
    return (b.readUInt32BE(0) * 2 ** 21 + (b.readUInt32BE(4) >>> 11)) / 2 ** 53
  }
}

/** tweetnacl's PRNG: queued fixed draws first, then "anchor-prng-<k>". */
function installNacl (nacl) {
  nacl.setPRNG(function prng (x, n) {
    let bytes
    if (state.script.length) {
      bytes = state.script.shift()
      if (bytes.length !== n) throw new Error(`scripted draw of ${bytes.length} bytes, ${n} asked`)
      state.log.push({ label: 'fixed', n, hex: Buffer.from(bytes).toString('hex') })
    } else {
      const label = `anchor-prng-${state.nacl++}`
      bytes = draw(label, n)
      state.log.push({ label, n, hex: bytes.toString('hex') })
    }
    for (let i = 0; i < n; i++) x[i] = bytes[i]
  })
}

function naclCounter (k) { state.nacl = k }
function naclScript (buffers) { state.script.push(...buffers.map((b) => Buffer.from(b))) }
/** The tweetnacl draws made since the last call. */
function naclDraws () { return state.log.splice(0) }

function fixClock (ms) {
  const RealDate = Date
  class FixedDate extends RealDate {
    constructor (...args) {
      if (args.length) super(...args)
      else super(ms)
    }
  }
  global.Date = FixedDate
}

module.exports = { draw, install, installNacl, naclCounter, naclScript, naclDraws, fixClock, realRandomBytes }
