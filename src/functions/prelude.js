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

  delete global.__log;
  delete global.__fetch;
  delete global.__atob;
  delete global.__btoa;
})(globalThis);
