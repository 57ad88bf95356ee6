/*! keyward page script (kw.js). No dependencies.
 *
 * Include it from keyward:  <script src="https://api.example.com/.keyward/kw.js"></script>
 * then call the API with    keyward.fetch('/postcodes/SW1A1AA')   (same arguments as fetch).
 *
 * At load it fetches a page token from keyward (GET /.keyward/token, no credentials). When keyward
 * asks for proof-of-work it answers with an Altcha v2 challenge, which is solved in Web Workers
 * (Blob URL; in the page, time-sliced, when workers are blocked) and POSTed back to mint the token.
 * keyward.fetch attaches the token as the `Keyward-Token` header, waits out `min_age`, fetches a
 * new token before the old one expires or runs out of calls, and on a `token-*` refusal fetches a
 * new one and retries once.
 *
 *   keyward.fetch(url, init)       paths resolve against keyward's origin (where this script came from)
 *   keyward.fetch(url, {keywardQuery: true, ...})   the token goes in `kw_token=` instead of a header:
 *                                  a simple GET then needs no CORS preflight
 *   keyward.url(url)  -> Promise<string>   the URL with `kw_token=` (for <img>, EventSource, ...)
 *   keyward.token()   -> Promise<string>   the current token
 *   keyward.ready     -> Promise           the first token (rejects when none can be had)
 *   keyward.solve(challenge, {workers, mode}) -> Promise<{counter, derivedKey, time}>
 *                                  solve an Altcha v2 challenge (workers: 0 = in the page;
 *                                  mode "auto" | "subtle" | "js")
 * Attributes on the <script> tag: data-keyward="https://api.example.com" (keyward's origin, if the
 * script is served from elsewhere), data-prefetch="false" (no token until the first call),
 * data-workers="N" (solver workers; default min(4, cores)).
 */
(function () {
  'use strict';

  /* The solver: runs in a worker (its source is this function's text) or in the page. */
  function kwSolver() {
    /* Int32Array wraps the unsigned constants into 32-bit words. */
    var K = new Int32Array([
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
    ]);
    var IV = new Int32Array([
      0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
    ]);
    var W = new Int32Array(64);

    /* One SHA-256 compression of W[0..15] into state H (8 words). */
    function compress(H) {
      var t, a, b, c, d, e, f, g, h, s0, s1, x, y;
      for (t = 16; t < 64; t++) {
        x = W[t - 15];
        s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
        x = W[t - 2];
        s1 = ((x >>> 17) | (x << 15)) ^ ((x >>> 19) | (x << 13)) ^ (x >>> 10);
        W[t] = (W[t - 16] + s0 + W[t - 7] + s1) | 0;
      }
      a = H[0]; b = H[1]; c = H[2]; d = H[3]; e = H[4]; f = H[5]; g = H[6]; h = H[7];
      for (t = 0; t < 64; t++) {
        s1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
        x = (h + s1 + ((e & f) ^ (~e & g)) + K[t] + W[t]) | 0;
        s0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
        y = (s0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
        h = g; g = f; f = e; e = (d + x) | 0; d = c; c = b; b = a;
        a = (x + y) | 0;
      }
      H[0] = (H[0] + a) | 0; H[1] = (H[1] + b) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
      H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
    }

    /* Load bytes (<= 55 of them, the message's last block) into W with padding for `total` bytes. */
    function block(bytes, total) {
      var i;
      for (i = 0; i < 16; i++) W[i] = 0;
      for (i = 0; i < bytes.length; i++) W[i >> 2] |= bytes[i] << (24 - 8 * (i & 3));
      W[bytes.length >> 2] |= 0x80 << (24 - 8 * (bytes.length & 3));
      W[15] = total * 8;
    }

    /* Load 8 words (a 32-byte digest) into W with padding for `total` bytes. */
    function block8(words, total) {
      for (var i = 0; i < 8; i++) W[i] = words[i];
      W[8] = -0x80000000;
      for (i = 9; i < 15; i++) W[i] = 0;
      W[15] = total * 8;
    }

    function toBytes(words, n) {
      var out = new Uint8Array(n);
      for (var i = 0; i < n; i++) out[i] = words[i >> 2] >>> (24 - 8 * (i & 3));
      return out;
    }

    /* Iterated SHA-256 (Altcha "SHA-256"): sha256(salt || password), then sha256 of that, cost times. */
    function shaJs(salt, password, cost) {
      var H = new Int32Array(IV), msg = new Uint8Array(salt.length + password.length);
      msg.set(salt);
      msg.set(password, salt.length);
      block(msg, msg.length);
      compress(H);
      for (var i = 1; i < cost; i++) {
        block8(H, 32);
        H.set(IV);
        compress(H);
      }
      return H;
    }

    /* PBKDF2-HMAC-SHA-256, one 32-byte output block; password and salt+4 each fit one block. */
    function pbkdf2Js(password, salt, cost) {
      var pad = new Uint8Array(64), inner = new Int32Array(IV), outer = new Int32Array(IV), i, j;
      var U = new Int32Array(8), T = new Int32Array(8), S = new Int32Array(8);
      for (i = 0; i < 64; i++) pad[i] = (password[i] || 0) ^ 0x36;
      for (i = 0; i < 16; i++) W[i] = (pad[4 * i] << 24) | (pad[4 * i + 1] << 16) | (pad[4 * i + 2] << 8) | pad[4 * i + 3];
      compress(inner);
      for (i = 0; i < 64; i++) pad[i] ^= 0x36 ^ 0x5c;
      for (i = 0; i < 16; i++) W[i] = (pad[4 * i] << 24) | (pad[4 * i + 1] << 16) | (pad[4 * i + 2] << 8) | pad[4 * i + 3];
      compress(outer);
      var first = new Uint8Array(salt.length + 4);
      first.set(salt);
      first[salt.length + 3] = 1;
      S.set(inner);
      block(first, 64 + first.length);
      compress(S);
      for (i = 0; i < cost; i++) {
        if (i > 0) {
          S.set(inner);
          block8(U, 96);
          compress(S);
        }
        block8(S, 96);
        U.set(outer);
        compress(U);
        for (j = 0; j < 8; j++) T[j] ^= U[j];
      }
      return T;
    }

    function hex2bytes(h) {
      var out = new Uint8Array(h.length >> 1);
      for (var i = 0; i < out.length; i++) out[i] = parseInt(h.substr(2 * i, 2), 16);
      return out;
    }

    function bytes2hex(b) {
      var s = '';
      for (var i = 0; i < b.length; i++) s += (b[i] < 16 ? '0' : '') + b[i].toString(16);
      return s;
    }

    function password(nonce, counter) {
      var p = new Uint8Array(nonce.length + 4);
      p.set(nonce);
      new DataView(p.buffer).setUint32(nonce.length, counter >>> 0, false);
      return p;
    }

    /* The derived key for one counter: a Promise (subtle) or bytes (js). */
    function derive(algo, cost, len, salt, pw, subtle) {
      if (algo === 'PBKDF2/SHA-256') {
        if (!subtle) return toBytes(pbkdf2Js(pw, salt, cost), len);
        return subtle.importKey('raw', pw, { name: 'PBKDF2' }, false, ['deriveBits']).then(function (k) {
          return subtle.deriveBits({ name: 'PBKDF2', salt: salt, iterations: cost, hash: 'SHA-256' }, k, len * 8);
        }).then(function (b) { return new Uint8Array(b); });
      }
      if (algo !== 'SHA-256') throw new Error('keyward: unsupported challenge algorithm ' + algo);
      if (!subtle) return toBytes(shaJs(salt, pw, cost), len);
      var data = new Uint8Array(salt.length + pw.length), n = 0;
      data.set(salt);
      data.set(pw, salt.length);
      function more(d) {
        return n++ < cost ? subtle.digest('SHA-256', d).then(function (b) { return more(new Uint8Array(b).slice(0, len)); }) : d;
      }
      return more(data);
    }

    /* Solve counters start, start+step, ... until the key starts with keyPrefix. Sync work runs in
       slices of ~40 ms so the thread stays responsive. */
    function solve(challenge, start, step, mode) {
      var p = challenge.parameters, len = p.keyLength || 32, t0 = Date.now();
      var salt = hex2bytes(p.salt), nonce = hex2bytes(p.nonce), prefix = p.keyPrefix.toLowerCase();
      var deadline = t0 + 300000; /* a bound; the server judges expiry */
      var subtle = typeof crypto !== 'undefined' && crypto.subtle;
      if (mode === 'js' || (mode !== 'subtle' && p.algorithm === 'SHA-256')) subtle = null;
      if (mode === 'subtle' && !subtle) return Promise.reject(new Error('keyward: crypto.subtle is unavailable'));
      var counter = start;
      return new Promise(function (resolve, reject) {
        function found(key) {
          var h = bytes2hex(key);
          if (h.lastIndexOf(prefix, 0) === 0) {
            resolve({ counter: counter, derivedKey: h, time: Date.now() - t0 });
            return true;
          }
          counter += step;
          return false;
        }
        function slice() {
          try {
            if (Date.now() > deadline) return reject(new Error('keyward: challenge expired before it was solved'));
            if (subtle) {
              return derive(p.algorithm, p.cost, len, salt, password(nonce, counter), subtle).then(function (k) {
                if (!found(k)) slice();
              }, reject);
            }
            var end = Date.now() + 40;
            while (Date.now() < end) {
              for (var i = 0; i < 16; i++) if (found(derive(p.algorithm, p.cost, len, salt, password(nonce, counter)))) return;
            }
            setTimeout(slice, 0);
          } catch (e) {
            reject(e);
          }
        }
        slice();
      });
    }

    return {
      solve: solve,
      serve: function (scope) {
        scope.onmessage = function (e) {
          var m = e.data;
          solve(m.challenge, m.start, m.step, m.mode).then(function (r) {
            scope.postMessage({ ok: r });
          }, function (err) {
            scope.postMessage({ error: String(err && err.message || err) });
          });
        };
      }
    };
  }

  var script = document.currentScript;
  var attr = function (n) { return script && script.getAttribute(n); };
  var base = attr('data-keyward') || (script && script.src ? new URL(script.src, location.href).origin : location.origin);
  var cores = navigator.hardwareConcurrency || 2;
  var defaultWorkers = Math.max(1, Math.min(4, parseInt(attr('data-workers'), 10) || cores));
  var workerUrl = null;

  /* Solve in `workers` Web Workers (counters interleaved); in the page (time-sliced) when workers
     are blocked or `workers` is 0. */
  function solve(challenge, opts) {
    opts = opts || {};
    var n = opts.workers === undefined ? defaultWorkers : opts.workers, mode = opts.mode || 'auto', pool = [];
    if (n < 1) return kwSolver().solve(challenge, 0, 1, mode);
    try {
      if (!workerUrl) {
        var src = '(' + kwSolver.toString() + ')().serve(self);';
        workerUrl = URL.createObjectURL(new Blob([src], { type: 'text/javascript' }));
      }
      for (var i = 0; i < n; i++) pool.push(new Worker(workerUrl));
    } catch (e) {
      pool.forEach(function (w) { w.terminate(); });
      return kwSolver().solve(challenge, 0, 1, mode);
    }
    var stop = function () { pool.forEach(function (w) { w.terminate(); }); };
    return new Promise(function (resolve, reject) {
      var failed = 0;
      pool.forEach(function (w, i) {
        w.onmessage = function (e) {
          if (e.data.ok) { stop(); resolve(e.data.ok); }
          else if (++failed === n) { stop(); reject(new Error(e.data.error)); }
        };
        /* Workers that cannot start (a CSP without blob: workers): solve in the page instead. */
        w.onerror = function (e) {
          e.preventDefault();
          if (++failed === n) { stop(); resolve(kwSolver().solve(challenge, 0, 1, mode)); }
        };
        w.postMessage({ challenge: challenge, start: i, step: n, mode: mode });
      });
    });
  }

  var endpoint = base + '/.keyward/token';
  var current = null; /* {token, expires, usable, left} in performance.now() ms */
  var pending = null;

  function answer(r) {
    return r.json().catch(function () { return {}; }).then(function (j) {
      if (!r.ok) throw new Error('keyward: token endpoint answered ' + r.status + (j.detail ? ': ' + j.detail : ''));
      return j;
    });
  }

  function mintNow() {
    var t0 = performance.now();
    return fetch(endpoint, { credentials: 'omit', mode: 'cors', cache: 'no-store' }).then(answer).then(function (j) {
      if (j.token) return j;
      if (!j.challenge) throw new Error('keyward: token endpoint sent neither a token nor a challenge');
      return solve(j.challenge).then(function (solution) {
        var payload = btoa(JSON.stringify({ challenge: j.challenge, solution: solution }));
        return fetch(endpoint, {
          method: 'POST', credentials: 'omit', mode: 'cors', cache: 'no-store',
          headers: { 'Content-Type': 'text/plain' }, body: JSON.stringify({ payload: payload })
        }).then(answer);
      });
    }).then(function (j) {
      /* Times are counted from the request, so clock skew and latency only shorten them. */
      current = {
        token: j.token,
        expires: t0 + j.expires_in * 1000,
        usable: t0 + (j.min_age || 0) * 1000,
        left: j.max_calls
      };
      return current;
    });
  }

  function mint() {
    if (!pending) {
      pending = mintNow().then(function (c) { pending = null; return c; }, function (e) { pending = null; throw e; });
    }
    return pending;
  }

  /* A token with at least one call and some life left, after its min_age. */
  function fresh() {
    var c = current, now = performance.now();
    var ok = c && c.left > 0 && now < c.expires - Math.min(30000, (c.expires - c.usable) / 10);
    return (ok ? Promise.resolve(c) : mint()).then(function (c) {
      var wait = c.usable - performance.now();
      return wait > 0 ? new Promise(function (r) { setTimeout(function () { r(c); }, wait); }) : c;
    });
  }

  function withQuery(url, token) {
    var u = new URL(url, base + '/');
    u.searchParams.set('kw_token', token);
    return u.toString();
  }

  function refusal(r) {
    if (r.status !== 403) return Promise.resolve(null);
    return r.clone().json().then(function (j) {
      var m = /:(token-[a-z-]+)$/.exec(j && j.type || '');
      return m ? { type: m[1], retry: parseInt(r.headers.get('Retry-After'), 10) || 0 } : null;
    }, function () { return null; });
  }

  /* `input` is a URL (string or URL object); a Request lends its URL, method and headers. */
  function call(input, init, again) {
    init = init || {};
    var req = typeof Request !== 'undefined' && input instanceof Request ? input : null;
    var viaQuery = init.keywardQuery, url = req ? req.url : String(input);
    var opts = {};
    if (req) { opts.method = req.method; opts.headers = req.headers; }
    for (var k in init) if (k !== 'keywardQuery') opts[k] = init[k];
    return fresh().then(function (c) {
      c.left--;
      var target = new URL(url, base + '/').toString();
      if (viaQuery) {
        target = withQuery(target, c.token);
      } else {
        var h = new Headers(opts.headers);
        h.set('Keyward-Token', c.token);
        opts.headers = h;
      }
      return fetch(target, opts).then(function (r) {
        if (again) return r;
        return refusal(r).then(function (p) {
          if (!p) return r;
          if (p.retry > 0 && p.retry <= 10) {
            return new Promise(function (res) { setTimeout(res, p.retry * 1000); }).then(function () { return call(input, init, true); });
          }
          if (current === c) current = null;
          return call(input, init, true);
        });
      });
    });
  }

  var ready = attr('data-prefetch') === 'false' ? null : mint();
  if (ready) ready.catch(function () {});

  window.keyward = {
    fetch: function (input, init) { return call(input, init, false); },
    url: function (url) { return fresh().then(function (c) { c.left--; return withQuery(url, c.token); }); },
    token: function () { return fresh().then(function (c) { return c.token; }); },
    ready: ready || Promise.resolve(null),
    solve: solve
  };
})();
