#!/usr/bin/env node
/*
 * Test harness: a queue-xec Master on the real npm `bugout` (0.0.13 / WebTorrent 1.9.7),
 * for the Python worker's interop tests. Loopback only: no trackers, no DHT, no LSD,
 * no uTP, no web seeds; peers are added by hand with {"cmd":"addPeer"}. With
 * QX_TRACKER set it also speaks WebRTC (@roamhq/wrtc) through that one local tracker.
 *
 * It answers the four queue-xec RPCs (isMaster, requestExecAssets, requestWork,
 * shareResults) plus `ping` with the same argument/answer shapes and the same rules as
 * queue-xec/master src/index.js (v2.1.0), written independently from those facts.
 *
 * Environment:
 *   QX_TOKEN    bugout identifier (the queue-xec `token`)                  required
 *   QX_KEY      transferEncryptToken, must be 32 UTF-8 bytes              required
 *   QX_PORT     WebTorrent torrentPort (0 or unset = any free port)
 *   QX_ASSETS   JSON file {"files":[{masterPath (absolute), name, workerPath}], "dependencies":[...]}
 *               (unset = no user files; the default task.js is added as the real master does)
 *   QX_JOBS     number of trivial jobs pushed at start: {"id": i, "data": JSON.stringify({"x": i})}
 *   QX_REUSE_IV =1: one IV for the whole process, exactly like the real JS Crypt class
 *               (default: a fresh random IV per encrypted message)
 *   QX_NODELAY  =1: TCP_NODELAY on every wire socket (the real master leaves Nagle on)
 *   QX_READ_PAUSE_MS  after each chunk a wire's socket delivers, reading stops this long (a
 *               master too busy to read: what came meanwhile is read, answered and echoed at once)
 *   QX_TURN_LIMIT  bytes: the original master's stall. queue-xec/master 2.1.0 (its lockfile has
 *               streamx 2.16.0 under WebTorrent's speed-limiter) never writes to a wire again
 *               once about 16 KiB went into it within one turn of its event loop: the Throttle
 *               parks a chunk and nothing wakes it. Here, past this many bytes pushed to a wire
 *               before the next microtask checkpoint, nothing more goes out on it;
 *               {"event":"stalled","addr","bytes"} says when
 *   QX_DHT_BOOTSTRAP  comma-separated 127.x.x.x:port list: run WebTorrent's DHT (BEP 5)
 *               bootstrapped from these local nodes only, as the real master finds workers
 *               on the internet. Refused outside a loopback-only network namespace
 *               (`unshare -n`). Unset = no DHT (the loopback-only default).
 *   QX_TRACKER  ws://127.0.0.1:PORT: announce there and take WebRTC peers (iceServers
 *               empty); refused outside a network namespace whose interfaces are all
 *               loopback (`unshare -n`)
 *
 * stdout: JSON lines only
 *   {"event":"ready","address","port","infoHash","identifier"}
 *   {"event":"seen","address"}          {"event":"left","address"}
 *   {"event":"wire","addr"}             (a BitTorrent wire with bo_channel came up)
 *   {"event":"rpc","call","from","args"}  for every RPC call received (before it is answered)
 *   {"event":"result","result":<decrypted result object>}   for every shareResults
 *   {"event":"error","message"}
 *   {"event":"pushed","size"}  {"event":"assets","unifiedHash","files":[names]}  {"event":"size","size"}
 * stdin: JSON lines
 *   {"cmd":"push","job":<object|string|number>}
 *   {"cmd":"addPeer","addr":"127.0.0.1:PORT"}
 *   {"cmd":"setAssets","path":"/abs/assets.json"}
 *   {"cmd":"size"}
 *   {"cmd":"close"}          (stdin EOF closes too)
 */
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const readline = require('readline');
const Bugout = require('bugout');

const WebTorrent = Bugout.prototype.WebTorrent; // the exact WebTorrent bugout uses

// stdout is reserved for JSON lines: anything else any library prints goes to stderr.
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
// eslint-disable-next-line no-console
console.log = console.error;
// eslint-disable-next-line no-console
console.info = console.error;
// eslint-disable-next-line no-console
console.debug = console.error;
const emitError = (message) => out({ event: 'error', message: String(message) });

process.on('uncaughtException', (e) => emitError(`uncaught: ${e && e.stack ? e.stack : e}`));
process.on('unhandledRejection', (e) => emitError(`unhandled rejection: ${e && e.stack ? e.stack : e}`));

// ---------------------------------------------------------------- configuration
const TOKEN = process.env.QX_TOKEN;
const KEY = process.env.QX_KEY;
const PORT = Number(process.env.QX_PORT || 0) || 0;
const REUSE_IV = process.env.QX_REUSE_IV === '1';
const NODELAY = process.env.QX_NODELAY === '1';
const READ_PAUSE_MS = Number(process.env.QX_READ_PAUSE_MS || 0) || 0;
const TURN_LIMIT = Number(process.env.QX_TURN_LIMIT || 0) || 0;
const TRACKER = process.env.QX_TRACKER || '';

function fail(message) {
  emitError(message);
  process.exit(2);
}
if (!TOKEN) fail('QX_TOKEN is required');
if (!KEY) fail('QX_KEY is required');
const keyBytes = Buffer.from(KEY, 'utf8');
if (keyBytes.length !== 32) fail(`QX_KEY must be 32 UTF-8 bytes, got ${keyBytes.length}`);
if (TRACKER) {
  if (!/^ws:\/\/127\.0\.0\.1:\d+\/?$/.test(TRACKER)) fail('QX_TRACKER must be ws://127.0.0.1:PORT');
  const ifs = Object.values(os.networkInterfaces());
  if (!ifs.every((addrs) => addrs.every((a) => a.internal))) {
    fail('QX_TRACKER refused: run it inside `unshare -n` (non-loopback interface present)');
  }
}

// ---------------------------------------------------------------- AES-256-CBC, {iv, encryptedData} hex
const processIv = crypto.randomBytes(16);
function encrypt(text) {
  const iv = REUSE_IV ? processIv : crypto.randomBytes(16);
  const cipher = crypto.createCipheriv('aes-256-cbc', keyBytes, iv);
  // numbers are stringified like the real master's Crypt.encrypt; strings are UTF-8
  const data = Buffer.concat([cipher.update(String(text), 'utf8'), cipher.final()]);
  return { iv: iv.toString('hex'), encryptedData: data.toString('hex') };
}
function decrypt(obj) {
  if (!obj || typeof obj.iv !== 'string' || typeof obj.encryptedData !== 'string') {
    throw new Error('decrypt: expected {iv, encryptedData} hex strings');
  }
  const decipher = crypto.createDecipheriv('aes-256-cbc', keyBytes, Buffer.from(obj.iv, 'hex'));
  return Buffer.concat([decipher.update(Buffer.from(obj.encryptedData, 'hex')), decipher.final()]).toString('utf8');
}

// ---------------------------------------------------------------- exec assets
// The real master appends a default task.js ({masterPath:'/src/task.js', name:'task.js',
// workerPath:'/workplace/task.js'}) when the user's list has none. We write an equivalent
// trivial task to a temp dir (its run() parses job.data and resolves {}).
let defaultTaskPath = null;
function getDefaultTaskPath() {
  if (defaultTaskPath) return defaultTaskPath;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qx-master-'));
  defaultTaskPath = path.join(dir, 'task.js');
  fs.writeFileSync(
    defaultTaskPath,
    [
      '// default task.js of the interop master (stands in for queue-xec master src/task.js)',
      'class Task {',
      '  constructor() {',
      '    this.data = null;',
      '  }',
      '',
      '  async run(job) {',
      '    this.data = JSON.parse(job.data);',
      '    return {};',
      '  }',
      '}',
      '',
      'module.exports = Task;',
      '',
    ].join('\n')
  );
  process.on('exit', () => {
    try {
      fs.rmSync(path.dirname(defaultTaskPath), { recursive: true, force: true });
    } catch (e) {
      /* ignore */
    }
  });
  return defaultTaskPath;
}

function loadAssets(file) {
  let spec = { files: [], dependencies: [] };
  if (file) spec = JSON.parse(fs.readFileSync(file, 'utf8'));
  const files = Array.isArray(spec.files) ? spec.files.map((f) => ({ ...f })) : [];
  const dependencies = Array.isArray(spec.dependencies) ? spec.dependencies.slice() : [];
  const tasks = files.filter((f) => f.name === 'task.js');
  if (tasks.length > 1) throw new Error('only one file named task.js may be listed in execAssets.files');
  if (tasks.length === 0) {
    files.push({ masterPath: getDefaultTaskPath(), name: 'task.js', workerPath: '/workplace/task.js', sha256: null });
  }
  return { files, dependencies };
}

let execAssets;
try {
  execAssets = loadAssets(process.env.QX_ASSETS);
} catch (e) {
  fail(`QX_ASSETS: ${e.message}`);
}

const sha256File = (p) => crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex');

// Unified hash = concatenated hex SHA-256 of every asset file (raw bytes) in list order;
// files missing on disk are left out of the hash and of the answer.
function hashAssets() {
  let unifiedHash = '';
  const present = [];
  for (const file of execAssets.files) {
    let sha = null;
    try {
      sha = sha256File(file.masterPath);
    } catch (e) {
      process.stderr.write(`asset ${file.name}: ${file.masterPath}: ${e.message}\n`);
    }
    if (sha) {
      // eslint-disable-next-line no-param-reassign
      file.sha256 = sha;
      unifiedHash += sha;
      present.push(file);
    }
  }
  return { unifiedHash, present };
}

function answerExecAssets(currentHash) {
  const { unifiedHash, present } = hashAssets();
  if (currentHash === unifiedHash) return { status: 'same', files: [] };
  const files = present.map((file) => ({
    ...file,
    // the real master reads assets as UTF-8 text and encrypts that string
    content: encrypt(fs.readFileSync(file.masterPath, { encoding: 'utf8' })),
  }));
  return { status: 'changed', dependencies: execAssets.dependencies, files };
}

// ---------------------------------------------------------------- job queue
// Entries are what the real master enqueues: JSON.stringify(encrypt(payloadJson)).
const jobs = [];
function pushNewJob(payload) {
  if (typeof payload === 'undefined') throw new Error('payload is undefined');
  const plain = typeof payload === 'object' ? JSON.stringify(payload) : payload;
  jobs.push(JSON.stringify(encrypt(plain)));
}

// Same decision table as the real master's requestWork handler (same JS coercions:
// getBatch is tested for truthiness, batchSize may arrive as a string).
function answerRequestWork(args) {
  const size = jobs.length;
  if (size > 1) {
    if (args.getBatch) {
      // eslint-disable-next-line no-param-reassign
      args.batchTasks = [];
      let total = args.batchSize;
      if (size <= args.batchSize) total = 1; // not more than batchSize queued: one job only
      for (let i = 0; i < total; i += 1) {
        const job = jobs.shift();
        if (job === undefined) break;
        args.batchTasks.push(job);
      }
      return args;
    }
    // eslint-disable-next-line no-param-reassign
    args.task = null;
    const job = jobs.shift();
    // eslint-disable-next-line no-param-reassign
    if (job !== undefined) args.task = job;
    return args;
  }
  // eslint-disable-next-line no-param-reassign
  args.task = size === 1 ? jobs.shift() : null;
  return args;
}

// ---------------------------------------------------------------- bugout on a loopback-only WebTorrent
function dhtOption() {
  const list = (process.env.QX_DHT_BOOTSTRAP || '').split(',').map((s) => s.trim()).filter(Boolean);
  if (!list.length) return false;
  const ifs = Object.values(os.networkInterfaces());
  if (!ifs.every((addrs) => addrs.every((a) => a.internal))) {
    fail('QX_DHT_BOOTSTRAP refused: run inside `unshare -n` (non-loopback interface present)');
  }
  list.forEach((entry) => {
    if (!/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$/.test(entry)) fail(`bootstrap ${entry} is not 127.x.x.x:port`);
  });
  return { bootstrap: list };
}

const wt = new WebTorrent({
  torrentPort: PORT,
  dht: dhtOption(),
  lsd: false,
  // with QX_TRACKER: bittorrent-tracker's client gets wrtc and an empty ICE server list
  tracker: TRACKER ? { wrtc: require('@roamhq/wrtc'), rtcConfig: { iceServers: [] } } : false,
  natUpnp: false,
  natPmp: false,
  webSeeds: false,
  utp: false,
});
wt.on('error', (e) => emitError(`webtorrent: ${e && e.message ? e.message : e}`));

const announce = TRACKER ? [TRACKER] : [];
const peer = new Bugout(TOKEN, { announce, torrentOpts: { announce }, wt });

peer.on('seen', (address) => out({ event: 'seen', address }));
peer.on('left', (address) => out({ event: 'left', address }));
peer.on('rpc', (from, call, args) => out({ event: 'rpc', call, from, args }));
peer.torrent.on('wire', (wire, addr) => {
  out({ event: 'wire', addr: addr || null });
  const p = Object.values(peer.torrent._peers || {}).find((x) => x.wire === wire);
  if (NODELAY) {
    if (p && p.conn && typeof p.conn.setNoDelay === 'function') p.conn.setNoDelay(true);
  }
  if (READ_PAUSE_MS && p && p.conn) readSlowly(p.conn);
  if (TURN_LIMIT) stallPastTurnLimit(wire, addr || null);
});

function readSlowly(conn) {
  conn.on('data', () => {
    conn.pause();
    setTimeout(() => conn.resume(), READ_PAUSE_MS);
  });
}

function stallPastTurnLimit(wire, addr) {
  const push = wire.push.bind(wire);
  let turn = 0;
  let stalled = false;
  // eslint-disable-next-line no-param-reassign
  wire.push = (data) => {
    if (stalled) return true;
    if (data) {
      if (turn === 0) queueMicrotask(() => { turn = 0; });
      turn += data.length;
      if (turn > TURN_LIMIT) {
        stalled = true;
        out({ event: 'stalled', addr, bytes: turn });
        return true;
      }
    }
    return push(data);
  };
}
peer.torrent.on('error', (e) => emitError(`torrent: ${e && e.message ? e.message : e}`));

// Handlers: an exception (e.g. args not an object) means no answer, as in the real master
// (where it would escape into bugout's wire handler instead).
function register(call, handler) {
  peer.register(call, (from, args, cb) => {
    try {
      handler(args, cb);
    } catch (e) {
      emitError(`${call}: ${e.message}`);
    }
  });
}

register('ping', (args, cb) => {
  // eslint-disable-next-line no-param-reassign
  args.pong = true;
  cb(args);
});
register('isMaster', (args, cb) => {
  // eslint-disable-next-line no-param-reassign
  args.isMaster = 'yes';
  cb(args);
});
register('requestExecAssets', (args, cb) => {
  cb(answerExecAssets(args ? args.currentHash : undefined));
});
register('requestWork', (args, cb) => {
  cb(answerRequestWork(args));
});
register('shareResults', (args) => {
  // never answered, like the real master. args must be a JSON *string* of {iv, encryptedData}.
  if (typeof args !== 'string') {
    throw new Error(`expected a JSON string of {iv, encryptedData}, got ${args === null ? 'null' : typeof args}`);
  }
  let plain;
  try {
    plain = decrypt(JSON.parse(args));
  } catch (e) {
    throw new Error(`decryption failed: ${e.message}`);
  }
  out({ event: 'result', result: JSON.parse(plain) });
});

// ---------------------------------------------------------------- ready
let ready = false;
const whenListening = new Promise((resolve) => {
  if (wt.listening) resolve();
  else wt.once('listening', resolve);
});
const whenTorrent = new Promise((resolve) => {
  if (peer.torrent.infoHash && peer.torrent.ready) resolve();
  else peer.torrent.once('ready', resolve);
});
Promise.all([whenListening, whenTorrent]).then(() => {
  const n = Number(process.env.QX_JOBS || 0) || 0;
  for (let i = 0; i < n; i += 1) pushNewJob({ id: i, data: JSON.stringify({ x: i }) });
  ready = true;
  out({
    event: 'ready',
    address: peer.address(),
    port: wt.address().port,
    dhtPort: wt.dht ? wt.dhtPort : null,
    infoHash: peer.torrent.infoHash,
    identifier: peer.identifier,
  });
});

// ---------------------------------------------------------------- stdin commands
let closing = false;
function close(code = 0) {
  if (closing) return;
  closing = true;
  const done = () => process.exit(code);
  setTimeout(done, 3000).unref();
  try {
    peer.destroy(() => wt.destroy(done));
  } catch (e) {
    wt.destroy(done);
  }
}

function addPeer(addr) {
  const m = /^(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}):(\d{1,5})$/.exec(String(addr));
  if (!m) throw new Error(`addPeer: only 127.x.x.x:PORT (or localhost:PORT) is allowed, got ${addr}`);
  const host = m[1] === 'localhost' ? '127.0.0.1' : m[1];
  if (!peer.torrent.infoHash) throw new Error('addPeer: torrent not ready yet');
  peer.torrent.addPeer(`${host}:${m[2]}`);
}

function onCommand(line) {
  if (!line.trim()) return;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    emitError(`stdin: not JSON: ${line}`);
    return;
  }
  try {
    switch (msg.cmd) {
      case 'push':
        pushNewJob(msg.job);
        out({ event: 'pushed', size: jobs.length });
        break;
      case 'addPeer':
        if (!ready) throw new Error('addPeer: not ready yet');
        addPeer(msg.addr);
        break;
      case 'setAssets': {
        execAssets = loadAssets(msg.path);
        const { unifiedHash } = hashAssets();
        out({ event: 'assets', unifiedHash, files: execAssets.files.map((f) => f.name) });
        break;
      }
      case 'size':
        out({ event: 'size', size: jobs.length });
        break;
      case 'close':
        close(0);
        break;
      default:
        throw new Error(`unknown cmd ${JSON.stringify(msg.cmd)}`);
    }
  } catch (e) {
    emitError(e.message);
  }
}

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', onCommand);
rl.on('close', () => close(0));
