// A certified OpenID provider (panva/oidc-provider) for the relying party's interop tests.
//
//   node server.mjs [--port N] [--redirect-uri URL]... [--post-logout-redirect-uri URL]...
//                   [--backchannel-logout-uri URL] [--client-secret S]
//
// Every option can also come from the environment: OP_PORT, OP_REDIRECT_URIS and
// OP_POST_LOGOUT_REDIRECT_URIS (space-separated), OP_BACKCHANNEL_LOGOUT_URI, OP_CLIENT_SECRET.
// Port 0 picks a free port. Once listening, one JSON line goes to stdout:
//   {"issuer": "http://127.0.0.1:PORT"}
// The provider listens on 127.0.0.1 only and keeps everything in memory; it stops on SIGTERM,
// SIGINT, or when its stdin is a pipe that closes (so a crashed test runner leaves nothing behind).
//
// The login is oidc-provider's own development interaction (devInteractions: a login form,
// then a consent form); its login form takes the account id ("ext-alice") and ignores the
// password. One test-only route changes the user's groups, so a refresh can show them renewed:
//   PUT /_test/accounts/ext-alice/groups   body: ["sre", "admins"]

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { fstatSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const HOST = '127.0.0.1';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    'redirect-uri': { type: 'string', multiple: true },
    'post-logout-redirect-uri': { type: 'string', multiple: true },
    'backchannel-logout-uri': { type: 'string' },
    'client-secret': { type: 'string' },
  },
});

const words = (value) => (value ?? '').split(/\s+/).filter(Boolean);
const port = Number(args.port ?? process.env.OP_PORT ?? 0);
const redirectUris = args['redirect-uri'] ?? words(process.env.OP_REDIRECT_URIS);
const postLogoutRedirectUris = args['post-logout-redirect-uri']
  ?? words(process.env.OP_POST_LOGOUT_REDIRECT_URIS);
const backchannelLogoutUri = args['backchannel-logout-uri']
  ?? process.env.OP_BACKCHANNEL_LOGOUT_URI;
const clientSecret = args['client-secret']
  ?? process.env.OP_CLIENT_SECRET
  ?? 'gateway-external-secret';

if (!Number.isInteger(port) || port < 0 || port > 65535 || redirectUris.length === 0) {
  process.stderr.write('usage: node server.mjs [--port N] --redirect-uri URL [options]\n');
  process.exit(2);
}

// -- the account store ----------------------------------------------------------------------------

const accounts = new Map([
  ['ext-alice', {
    sub: 'ext-alice',
    email: 'alice@external.example',
    email_verified: true,
    name: 'Alice External',
    preferred_username: 'alice',
    groups: ['sre'],
  }],
]);

async function findAccount(_ctx, id) {
  const account = accounts.get(id);
  if (!account) {
    return undefined; // the provider goes no further (its error page): only ext-alice logs in
  }
  return {
    accountId: id,
    // All of them: the library releases only those of the granted scopes (`claims` below).
    async claims() {
      return { ...accounts.get(id) };
    },
  };
}

// -- keys -----------------------------------------------------------------------------------------

function signingKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = `ext-${randomBytes(6).toString('hex')}`;
  return { ...privateKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };
}

// -- the provider ---------------------------------------------------------------------------------

function configuration() {
  const client = {
    client_id: 'gateway',
    client_secret: clientSecret,
    token_endpoint_auth_method: 'client_secret_basic',
    redirect_uris: redirectUris,
    post_logout_redirect_uris: postLogoutRedirectUris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    id_token_signed_response_alg: 'RS256',
  };
  if (backchannelLogoutUri) {
    client.backchannel_logout_uri = backchannelLogoutUri;
    client.backchannel_logout_session_required = true;
  }
  return {
    clients: [client],
    jwks: { keys: [signingKey()] },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    findAccount,
    pkce: { methods: ['S256'], required: () => true },
    // Refresh tokens need `offline_access`, which the library keeps only with prompt=consent
    // (OIDC Core §11). Every refresh rotates the token; a spent one ends the grant.
    rotateRefreshToken: true,
    features: {
      devInteractions: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      backchannelLogout: { enabled: true },
    },
  };
}

// -- a test-only control route --------------------------------------------------------------------

async function control(req, res) {
  const match = /^\/_test\/accounts\/([^/]+)\/groups$/.exec(req.url ?? '');
  if (!match || req.method !== 'PUT' || !accounts.has(match[1])) {
    return false;
  }
  let body = '';
  for await (const chunk of req) {
    body += chunk;
  }
  const groups = JSON.parse(body);
  if (!Array.isArray(groups) || !groups.every((group) => typeof group === 'string')) {
    res.writeHead(400).end();
  } else {
    accounts.get(match[1]).groups = groups;
    res.writeHead(204).end();
  }
  return true;
}

// The provider's issuer names its port, so the socket is bound first and the provider made after.
let handle = (_req, res) => res.writeHead(503).end();
const server = createServer(async (req, res) => {
  try {
    if (!(await control(req, res))) {
      handle(req, res);
    }
  } catch (err) {
    process.stderr.write(`${err.stack}\n`);
    if (!res.headersSent) {
      res.writeHead(500).end();
    }
  }
});

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, HOST, resolve);
});

const issuer = `http://${HOST}:${server.address().port}`;
const provider = new Provider(issuer, configuration());
provider.on('server_error', (_ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
provider.on('backchannel.error', (_ctx, err) => {
  process.stderr.write(`backchannel.error: ${err}\n`);
});
handle = provider.callback();

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
if (fstatSync(0).isFIFO()) {
  // started by a test runner through a pipe: its end (the runner gone) stops the provider too
  process.stdin.on('end', stop);
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
