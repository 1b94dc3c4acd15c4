#!/usr/bin/env node
/*
 * Test harness: a queue-xec Worker on the real npm `bugout` (0.0.13 / WebTorrent 1.9.7),
 * for master.py's interop tests. Loopback only: no trackers, no DHT, no LSD, no uTP;
 * the master is added by hand with {"cmd":"addPeer"}.
 *
 * It calls and decides as queue-xec/worker src/index.js (v2.0.2) does, written
 * independently from those facts:
 * - `isMaster {}` to every peer it sees; a "yes" makes that peer its master (the last
 *   one wins), then `requestExecAssets {currentHash}`; the files are written under
 *   QX_FOLDER and task.js is loaded with require, then it asks for work.
 * - `requestWork {getBatch, batchSize}` carries the values as the JS worker reads them
 *   from its .env: strings (QX_GET_BATCH, QX_BATCH_SIZE), or false and 5 when unset.
 *   An answer's `task` runs at once; a `batchTasks` list (even an empty one) is queued
 *   and the worker asks again at once.
 * - Jobs run one at a time. After each: `shareResults` with one encrypted result
 *   (`{"jobID", "worker": {"name"}, "data"}`; no answer awaited), then the next queued
 *   job, or `requestWork` when none is left. A `requestWork` within 15 ms of the last
 *   is skipped (the JS worker compares milliseconds with its 15 s window): with fast
 *   jobs it then waits for its poll, which asks every 30 s if it has not for 15 s.
 *   Its IV is drawn once per process.
 *
 * Environment: QX_TOKEN, QX_KEY (32 UTF-8 bytes), QX_FOLDER (a writable folder),
 *   QX_GET_BATCH, QX_BATCH_SIZE, QX_NAME (default no_name),
 *   QX_POLL_SECONDS (default 30: the poll; tests shorten it, the rules stay)
 * stdout: JSON lines
 *   {"event":"ready","address","port"}   {"event":"master","address","keys"}  (its isMaster answer's)
 *   {"event":"request","answer":{"task":bool,"batchTasks":n|null}}   (each requestWork answer)
 *   {"event":"result","jobID"}           (a result sent)
 *   {"event":"error","message"}
 * stdin: {"cmd":"addPeer","addr":"127.0.0.1:PORT"}, {"cmd":"close"} (EOF closes too)
 */
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const readline = require('readline');
const Bugout = require('bugout');

const say = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
// eslint-disable-next-line no-console
console.log = console.error;
process.on('uncaughtException', (e) => say({ event: 'error', message: `uncaught: ${e && e.stack}` }));
process.on('unhandledRejection', (e) => say({ event: 'error', message: `unhandled: ${e && e.stack}` }));

const env = process.env;
const key = Buffer.from(env.QX_KEY || '', 'utf8');
const folder = env.QX_FOLDER;
if (!env.QX_TOKEN || key.length !== 32 || !folder) {
  say({ event: 'error', message: 'QX_TOKEN, QX_KEY (32 bytes) and QX_FOLDER are required' });
  process.exit(2);
}
const getBatch = 'QX_GET_BATCH' in env ? env.QX_GET_BATCH : false;
const batchSize = 'QX_BATCH_SIZE' in env ? env.QX_BATCH_SIZE : 5;
const iv = crypto.randomBytes(16); // one IV per process, as the JS worker's Crypt

const seal = (text) => {
  const cipher = crypto.createCipheriv('aes-256-cbc', key, iv);
  return { iv: iv.toString('hex'), encryptedData: Buffer.concat([cipher.update(text), cipher.final()]).toString('hex') };
};
const open = (sealed) => {
  const decipher = crypto.createDecipheriv('aes-256-cbc', key, Buffer.from(sealed.iv, 'hex'));
  return Buffer.concat([decipher.update(Buffer.from(sealed.encryptedData, 'hex')), decipher.final()]).toString();
};

const wt = new Bugout.prototype.WebTorrent({
  dht: false, lsd: false, tracker: false, natUpnp: false, natPmp: false, webSeeds: false, utp: false,
});
const peer = new Bugout(env.QX_TOKEN, { announce: [], torrentOpts: { announce: [] }, wt });

let master = null;
let task = null;
let working = false;
let lastAsked = -1;
const queued = [];

function runNext() {
  const job = queued.shift();
  working = true;
  Promise.resolve(task.run(job)).then((data) => {
    const result = { jobID: job.id, worker: { id: undefined, name: env.QX_NAME || 'no_name' }, data };
    peer.rpc(master, 'shareResults', JSON.stringify(seal(JSON.stringify(result))), () => {});
    say({ event: 'result', jobID: job.id });
    working = false;
    requestWork();
  });
}

function requestWork() {
  if (!master || !task || working) return;
  if (queued.length) {
    runNext();
    return;
  }
  if (Date.now() - lastAsked <= 15) return;
  lastAsked = Date.now();
  peer.rpc(master, 'requestWork', { getBatch, batchSize }, (answer) => {
    const batch = Array.isArray(answer.batchTasks) ? answer.batchTasks.length : null;
    say({ event: 'request', answer: { task: Boolean(answer.task), batchTasks: batch } });
    if (answer.task) {
      queued.push(JSON.parse(open(JSON.parse(answer.task))));
      requestWork();
    }
    if (answer.batchTasks) {
      answer.batchTasks.forEach((sealed) => queued.push(JSON.parse(open(JSON.parse(sealed)))));
      requestWork();
    }
  });
}

function takeAssets(answer) {
  if (answer.status !== 'changed') return;
  answer.files.forEach((file) => {
    const target = path.join(folder, file.workerPath);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, open(file.content));
  });
  const entry = answer.files.find((file) => file.name === 'task.js');
  // eslint-disable-next-line import/no-dynamic-require, global-require
  const Task = require(path.join(folder, entry.workerPath));
  task = new Task();
}

peer.on('seen', (address) => {
  peer.rpc(address, 'isMaster', {}, (answer) => {
    if (!answer || answer.isMaster !== 'yes') return;
    master = address;
    say({ event: 'master', address, keys: Object.keys(answer) });
    peer.rpc(address, 'requestExecAssets', { currentHash: '' }, (assets) => {
      takeAssets(assets);
      requestWork();
    });
  });
});
const poll = 1000 * (Number(env.QX_POLL_SECONDS) || 30);
setInterval(() => {
  if (Date.now() - lastAsked > poll / 2) requestWork();
}, poll).unref();

wt.on('listening', () => say({ event: 'ready', address: peer.address(), port: wt.address().port }));
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.cmd === 'addPeer' && /^127\.0\.0\.1:\d{1,5}$/.test(msg.addr)) peer.torrent.addPeer(msg.addr);
  if (msg.cmd === 'close') process.exit(0);
}).on('close', () => process.exit(0));
