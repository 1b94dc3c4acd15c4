'use strict'
/*
 * harness.js - spawn peer.js processes and talk to them (used by selftest_js.js
 * and bench_js_rpc.js). Each peer is a child process; we write JSON commands to
 * its stdin and collect the JSON events it prints on stdout.
 */
const { spawn } = require('child_process')
const path = require('path')
const readline = require('readline')

const PEER = path.join(__dirname, 'peer.js')

class PeerProc {
  constructor (name, env) {
    this.name = name
    this.events = [] // every event received, in order
    this.waiters = [] // pending waitFor() calls
    this.proc = spawn(process.execPath, [PEER], {
      env: Object.assign({}, process.env, env),
      stdio: ['pipe', 'pipe', process.env.HARNESS_STDERR ? 'inherit' : 'ignore']
    })
    this.exited = new Promise((resolve) => this.proc.on('exit', (code) => resolve(code)))
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      let ev
      try { ev = JSON.parse(line) } catch (e) { throw new Error(`${name}: non-JSON stdout: ${line}`) }
      ev.at = Date.now()
      this.events.push(ev)
      if (process.env.HARNESS_VERBOSE) console.error(`[${name}]`, JSON.stringify(ev))
      this.waiters = this.waiters.filter((w) => !(w.pred(ev) && (w.resolve(ev), true)))
    })
  }

  send (cmd) {
    this.proc.stdin.write(JSON.stringify(cmd) + '\n')
  }

  /** Resolve with the first event (already received or future) matching pred. */
  waitFor (pred, timeoutMs = 10000, { past = true } = {}) {
    if (typeof pred === 'string') { const name = pred; pred = (e) => e.event === name }
    if (past) {
      const hit = this.events.find(pred)
      if (hit) return Promise.resolve(hit)
    }
    return new Promise((resolve, reject) => {
      const w = { pred, resolve }
      this.waiters.push(w)
      setTimeout(() => {
        if (this.waiters.includes(w)) {
          this.waiters = this.waiters.filter((x) => x !== w)
          reject(new Error(`${this.name}: timeout waiting (${timeoutMs} ms) for ${pred}`))
        }
      }, timeoutMs).unref()
    })
  }

  close () {
    this.send({ cmd: 'close' })
    return this.exited
  }
}

module.exports = { PeerProc }
