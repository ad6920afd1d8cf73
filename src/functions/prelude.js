// The globals Segment's runtime gives functions, over the few native hooks the engine
// installs (__log, __fetch, __atob, __btoa). Runs once per runtime, before the script.
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

  const nativeFetch = global.__fetch;
  global.fetch = function (url, options) {
    options = options || {};
    const headers = new Headers(options.headers);
    const body = options.body == null ? null : String(options.body);
    const answer = JSON.parse(nativeFetch(String(url), String(options.method || 'GET'),
      JSON.stringify(headers._map), body));
    if (answer.refused) return Promise.reject(new Error(answer.refused));
    if (answer.error) {
      const e = new FetchError(answer.error);
      e.type = 'system';
      return Promise.reject(e);
    }
    return Promise.resolve(new Response(answer.body,
      { status: answer.status, headers: answer.headers, url: String(url) }));
  };

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

  // `request.url`'s query, decoded as forms encode it.
  class SearchParams {
    constructor(query) {
      this._pairs = [];
      for (const part of query.split('&')) {
        if (!part) continue;
        const at = part.indexOf('=');
        const decode = function (s) { return decodeURIComponent(s.replace(/\+/g, ' ')); };
        this._pairs.push(at < 0 ? [decode(part), ''] : [decode(part.slice(0, at)), decode(part.slice(at + 1))]);
      }
    }
    get(name) { const p = this._pairs.find(function (p) { return p[0] === name; }); return p ? p[1] : null; }
    getAll(name) { return this._pairs.filter(function (p) { return p[0] === name; }).map(function (p) { return p[1]; }); }
    has(name) { return this._pairs.some(function (p) { return p[0] === name; }); }
  }
  class RequestUrl {
    constructor(href) {
      const query = href.indexOf('?');
      this.href = href;
      this.search = query < 0 ? '' : href.slice(query);
      this.searchParams = new SearchParams(query < 0 ? '' : href.slice(query + 1));
    }
    toString() { return this.href; }
  }
  global.__sourceRequest = function (raw, settings) {
    emitted = [];
    sets = 0;
    const body = raw.body;
    const request = {
      method: raw.method,
      url: new RequestUrl(raw.url),
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
})(globalThis);
