// The globals Segment's runtime gives functions, over the few native hooks the engine
// installs (__log, __fetch, __atob, __btoa; globals.rs: __url, __decode, __encode,
// __digest, __uuid, __lodash). Runs once per runtime, before the script.
(function (global) {
  'use strict';
  function errorClass(name) {
    class E extends Error {
      constructor(message) {
        super(message);
        this.name = name;
      }
    }
    Object.defineProperty(E, 'name', { value: name });
    return E;
  }
  global.ValidationError = errorClass('ValidationError');
  global.EventNotSupported = errorClass('EventNotSupported');
  global.InvalidEventPayload = errorClass('InvalidEventPayload');
  global.RetryError = errorClass('RetryError');
  const FetchError = errorClass('FetchError');

  const log = global.__log;
  function show(args) {
    return Array.prototype.map.call(args, function (a) {
      if (typeof a === 'string') return a;
      if (a instanceof Error) return String(a);
      try { return JSON.stringify(a); } catch (e) { return String(a); }
    }).join(' ');
  }
  global.console = {
    log: function () { log('info', show(arguments)); },
    info: function () { log('info', show(arguments)); },
    debug: function () { log('debug', show(arguments)); },
    warn: function () { log('warn', show(arguments)); },
    error: function () { log('error', show(arguments)); },
  };

  const atob = global.__atob, btoa = global.__btoa;
  global.atob = function (s) { return atob(String(s)); };
  global.btoa = function (s) { return btoa(String(s)); };

  class Headers {
    constructor(init) {
      this._map = {};
      if (init) {
        const entries = init instanceof Headers ? Object.entries(init._map) : Object.entries(init);
        for (const [k, v] of entries) this._map[String(k).toLowerCase()] = String(v);
      }
    }
    get(name) {
      const v = this._map[String(name).toLowerCase()];
      return v === undefined ? null : v;
    }
    has(name) { return String(name).toLowerCase() in this._map; }
    set(name, value) { this._map[String(name).toLowerCase()] = String(value); }
    forEach(f) { for (const [k, v] of Object.entries(this._map)) f(v, k, this); }
    entries() { return Object.entries(this._map)[Symbol.iterator](); }
  }
  global.Headers = Headers;

  class Response {
    constructor(body, init) {
      init = init || {};
      this._body = body == null ? '' : String(body);
      this.status = init.status === undefined ? 200 : init.status;
      this.statusText = init.statusText || '';
      this.ok = this.status >= 200 && this.status < 300;
      this.headers = new Headers(init.headers);
      this.url = init.url || '';
    }
    text() { return Promise.resolve(this._body); }
    json() {
      try { return Promise.resolve(JSON.parse(this._body)); } catch (e) { return Promise.reject(e); }
    }
  }
  global.Response = Response;

  // The fetch API's `Request`: its URL parsed (so a bad one is a TypeError), the method
  // normalised as the spec does, and `init` over what a `Request` given as input holds.
  const NORMAL_METHODS = ['DELETE', 'GET', 'HEAD', 'OPTIONS', 'POST', 'PUT'];
  class Request {
    constructor(input, init) {
      init = init || {};
      const from = input instanceof Request ? input : null;
      this.url = new URL(from ? from.url : String(input)).href;
      let method = String(init.method || (from ? from.method : 'GET'));
      if (NORMAL_METHODS.indexOf(method.toUpperCase()) >= 0) method = method.toUpperCase();
      this.method = method;
      this.headers = new Headers(init.headers !== undefined ? init.headers : from && from.headers);
      const body = init.body !== undefined ? init.body : from && from._body;
      this._body = body == null ? null : String(body);
      if (this._body !== null && (method === 'GET' || method === 'HEAD')) {
        throw new TypeError('Request with GET/HEAD method cannot have body');
      }
    }
    text() { return Promise.resolve(this._body === null ? '' : this._body); }
    json() {
      try { return Promise.resolve(JSON.parse(this._body)); } catch (e) { return Promise.reject(e); }
    }
    clone() { return new Request(this); }
  }
  global.Request = Request;

  // What `fetch` did, for `fanout fn test` (__fetched takes them); only the last few are
  // kept, as nothing takes them in a running destination.
  const FETCHES_KEPT = 50;
  let fetched = [];
  global.__fetched = function () { const out = fetched; fetched = []; return out; };

  const nativeFetch = global.__fetch;
  global.fetch = function (input, init) {
    let request;
    try { request = new Request(input, init); } catch (e) { return Promise.reject(e); }
    const answer = JSON.parse(nativeFetch(request.url, request.method,
      JSON.stringify(request.headers._map), request._body));
    const seen = { method: request.method, url: request.url };
    if (answer.sent_to) seen.sent_to = answer.sent_to;
    if (answer.refused) seen.refused = answer.refused;
    else if (answer.error) seen.error = answer.error;
    else seen.status = answer.status;
    fetched.push(seen);
    if (fetched.length > FETCHES_KEPT) fetched.shift();
    if (answer.refused) return Promise.reject(new Error(answer.refused));
    if (answer.error) {
      const e = new FetchError(answer.error);
      e.type = 'system';
      return Promise.reject(e);
    }
    return Promise.resolve(new Response(answer.body,
      { status: answer.status, headers: answer.headers, url: request.url }));
  };

  // `setTimeout`: the engine runs due timers while the handler's promise is pending
  // (globals.rs `settle`) and drops the rest when the call ends.
  const now = global.__now;
  let timers = [], timerIds = 0;
  global.setTimeout = function (f, ms) {
    const args = Array.prototype.slice.call(arguments, 2);
    timerIds += 1;
    timers.push({ id: timerIds, at: now() + Math.max(0, Number(ms) || 0), f: f, args: args });
    return timerIds;
  };
  global.clearTimeout = function (id) { timers = timers.filter(function (t) { return t.id !== id; }); };
  function nextTimer() {
    timers.sort(function (a, b) { return a.at - b.at || a.id - b.id; });
    return timers[0];
  }
  global.__nextTimer = function () { const t = nextTimer(); return t ? Math.max(0, t.at - now()) : -1; };
  global.__fireTimer = function () { const t = nextTimer(); timers.shift(); t.f.apply(null, t.args); };
  global.__dropTimers = function () { timers = []; };

  // Source functions. `Segment.track(…)` and friends collect what `onRequest` emits,
  // shaped as Segment's shim does (spec fields only, falsy ones left out, the ids each
  // type needs checked); the engine calls __sourceRequest, which hands them back once
  // the handler settled, so a handler that throws emits nothing.
  const FIELDS = ['userId', 'anonymousId', 'event', 'name', 'properties', 'traits', 'groupId',
    'previousId', 'context', 'integrations', 'messageId', 'sentAt', 'timestamp'];
  const NEEDS = { track: 'event', group: 'groupId', alias: 'previousId' };
  let emitted = [], sets = 0;
  function emitter(type) {
    return function (fields) {
      fields = fields || {};
      const message = { type: type };
      for (const key of FIELDS) if (fields[key]) message[key] = fields[key];
      if (!message.userId && !message.anonymousId) {
        throw new global.ValidationError('Segment.' + type + ': userId or anonymousId is required');
      }
      const needed = NEEDS[type];
      if (needed && !message[needed]) {
        throw new global.ValidationError('Segment.' + type + ': ' + needed + ' is required');
      }
      emitted.push(message);
    };
  }
  global.Segment = {
    track: emitter('track'), identify: emitter('identify'), page: emitter('page'),
    screen: emitter('screen'), group: emitter('group'), alias: emitter('alias'),
    set: function () { sets += 1; },
  };

  // WHATWG `URLSearchParams`: pairs decoded and encoded as forms do. A URL's own
  // `searchParams` tells its URL when they change, so `href` and `search` follow.
  function formDecode(s) { return decodeURIComponent(s.replace(/\+/g, ' ')); }
  function formEncode(s) {
    return encodeURIComponent(s).replace(/%20/g, '+').replace(/[!'()~]/g, function (c) {
      return '%' + c.charCodeAt(0).toString(16).toUpperCase();
    });
  }
  class URLSearchParams {
    constructor(init) {
      this._pairs = [];
      this._changed = null;
      if (init == null) return;
      if (init instanceof URLSearchParams) {
        this._pairs = init._pairs.map(function (p) { return p.slice(); });
      } else if (typeof init === 'object') {
        const entries = Array.isArray(init) ? init : Object.entries(init);
        for (const [k, v] of entries) this._pairs.push([String(k), String(v)]);
      } else {
        let query = String(init);
        if (query[0] === '?') query = query.slice(1);
        for (const part of query.split('&')) {
          if (!part) continue;
          const at = part.indexOf('=');
          this._pairs.push(at < 0 ? [formDecode(part), '']
            : [formDecode(part.slice(0, at)), formDecode(part.slice(at + 1))]);
        }
      }
    }
    _touch() { if (this._changed) this._changed(this.toString()); }
    get size() { return this._pairs.length; }
    get(name) { const p = this._pairs.find(function (p) { return p[0] === String(name); }); return p ? p[1] : null; }
    getAll(name) { return this._pairs.filter(function (p) { return p[0] === String(name); }).map(function (p) { return p[1]; }); }
    has(name) { return this._pairs.some(function (p) { return p[0] === String(name); }); }
    append(name, value) { this._pairs.push([String(name), String(value)]); this._touch(); }
    delete(name) { this._pairs = this._pairs.filter(function (p) { return p[0] !== String(name); }); this._touch(); }
    set(name, value) {
      name = String(name);
      const at = this._pairs.findIndex(function (p) { return p[0] === name; });
      if (at < 0) this._pairs.push([name, String(value)]);
      else this._pairs = this._pairs.filter(function (p, i) { return p[0] !== name || i === at; })
        .map(function (p) { return p[0] === name ? [name, String(value)] : p; });
      this._touch();
    }
    forEach(f, self) { for (const [k, v] of this._pairs.slice()) f.call(self, v, k, this); }
    keys() { return this._pairs.map(function (p) { return p[0]; })[Symbol.iterator](); }
    values() { return this._pairs.map(function (p) { return p[1]; })[Symbol.iterator](); }
    entries() { return this._pairs.map(function (p) { return p.slice(); })[Symbol.iterator](); }
    [Symbol.iterator]() { return this.entries(); }
    toString() { return this._pairs.map(function (p) { return formEncode(p[0]) + '=' + formEncode(p[1]); }).join('&'); }
  }
  global.URLSearchParams = URLSearchParams;

  // WHATWG `URL`, parsed natively (the `url` crate); read-only but for `searchParams`.
  const parseUrl = global.__url;
  class URL {
    constructor(href, base) {
      const parts = JSON.parse(parseUrl(String(href), base === undefined ? undefined : String(base)));
      for (const key of ['protocol', 'username', 'password', 'hostname', 'port', 'host',
        'pathname', 'origin']) this[key] = parts[key];
      this.hash = parts.hash;
      this._beforeQuery = parts.beforeQuery;
      this._search = parts.search;
      this.searchParams = new URLSearchParams(parts.search);
      const self = this;
      this.searchParams._changed = function (query) { self._search = query ? '?' + query : ''; };
    }
    get search() { return this._search; }
    get href() { return this._beforeQuery + this._search + this.hash; }
    toString() { return this.href; }
    toJSON() { return this.href; }
  }
  global.URL = URL;

  // Node's `Buffer`, as far as functions use it: bytes with utf8/base64/hex/latin1
  // conversions done natively.
  const decodeBytes = global.__decode, encodeBytes = global.__encode;
  class Buffer extends Uint8Array {
    static from(value, encoding) {
      if (typeof value === 'string') return new Buffer(decodeBytes(value, String(encoding || 'utf8')));
      return new Buffer(value);
    }
    static alloc(size) { return new Buffer(size); }
    static isBuffer(value) { return value instanceof Buffer; }
    static byteLength(value, encoding) {
      return typeof value === 'string' ? Buffer.from(value, encoding).length : value.byteLength;
    }
    static concat(list) {
      const out = new Buffer(list.reduce(function (n, b) { return n + b.length; }, 0));
      let at = 0;
      for (const b of list) { out.set(b, at); at += b.length; }
      return out;
    }
    toString(encoding) { return encodeBytes(Array.from(this), String(encoding || 'utf8')); }
    toJSON() { return { type: 'Buffer', data: Array.from(this) }; }
  }
  global.Buffer = Buffer;

  // Node's `crypto`: md5, sha1 and SHA-2 digests and HMACs (native), and random v4 UUIDs.
  const nativeDigest = global.__digest, uuid = global.__uuid;
  function bytesOf(data, encoding) {
    return Array.from(typeof data === 'string' ? Buffer.from(data, encoding) : Buffer.from(data));
  }
  function hasher(algorithm, key) {
    algorithm = String(algorithm);
    nativeDigest(algorithm, key, []);
    let data = [];
    return {
      update: function (chunk, encoding) { data = data.concat(bytesOf(chunk, encoding)); return this; },
      digest: function (encoding) {
        const out = Buffer.from(nativeDigest(algorithm, key, data));
        return encoding ? out.toString(encoding) : out;
      },
    };
  }
  global.crypto = {
    createHash: function (algorithm) { return hasher(algorithm, null); },
    createHmac: function (algorithm, key) { return hasher(algorithm, bytesOf(key)); },
    randomUUID: function () { return uuid(); },
  };

  // `_`: lodash 4, run the first time a function reads `_`: most functions never do, and
  // running it at every load would add its parse and setup to each (benches/functions.rs).
  // Writable and configurable, so that a script may still declare its own `_`.
  const loadLodash = global.__lodash;
  function defineLodash(value) {
    Object.defineProperty(global, '_', { value: value, writable: true, configurable: true });
  }
  const lazyLodash = {
    configurable: true,
    get: function () {
      // lodash reads the `_` it replaces (for `noConflict`): it finds undefined, not this.
      defineLodash(undefined);
      try { loadLodash(); } catch (e) {
        // Out of time or memory: the next read tries again.
        Object.defineProperty(global, '_', lazyLodash);
        throw e;
      }
      return global._;
    },
    set: defineLodash,
  };
  Object.defineProperty(global, '_', lazyLodash);

  // A Host header that does not parse still leaves the path and query readable.
  function requestUrl(href) {
    try { return new URL(href); } catch (e) {
      return new URL(href.replace(/^[a-z]+:\/\/[^\/]*/, ''), 'http://localhost');
    }
  }
  global.__sourceRequest = function (raw, settings) {
    emitted = [];
    sets = 0;
    const body = raw.body;
    const request = {
      method: raw.method,
      url: requestUrl(raw.url),
      headers: new Headers(raw.headers),
      text: function () { return body; },
      json: function () { return JSON.parse(body); },
    };
    return Promise.resolve(global.onRequest(request, settings)).then(function () {
      const out = { messages: emitted, sets: sets };
      emitted = [];
      return out;
    });
  };

  delete global.__log;
  delete global.__fetch;
  delete global.__atob;
  delete global.__btoa;
  for (const hook of ['__url', '__decode', '__encode', '__digest', '__uuid', '__now', '__lodash']) {
    delete global[hook];
  }
})(globalThis);
