// A real OpenID Connect provider (oidc-provider, a certified implementation) on loopback, for
// ragapi's JWT and OAuth2 tests. Machine clients get JWT access tokens for the resource
// AUDIENCE by the client credentials grant; each token carries its client's tenant.
//
//   PORT=8123 AUDIENCE=https://ragapi.test node provider.mjs
//
// Every start makes a new RSA signing key with a new kid: a restart is a key rotation. Prints
// "listening <issuer>" once it serves. GET /test/jwks-requests answers how many times its key
// set has been fetched (so a test can see that forged key ids do not make ragapi hammer it).
import * as crypto from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.PORT);
const audience = process.env.AUDIENCE;
if (!port || !audience) {
  throw new Error('set PORT and AUDIENCE');
}
const issuer = `http://127.0.0.1:${port}`;
// A second resource server, for tokens meant for another API (a wrong audience at ragapi).
const otherAudience = 'https://another-api.test';

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: crypto.randomUUID(),
  alg: 'RS256',
  use: 'sig',
};

// client id -> [scopes it may ask for, tenant]; the secret is the id with "-secret".
const machines = {
  'acme-admin': ['read write admin', 'acme'],
  'acme-reader': ['read', 'acme'],
  'acme-short-lived': ['read', 'acme'],
};

const provider = new Provider(issuer, {
  clients: Object.entries(machines).map(([id, [scope, tenant]]) => ({
    client_id: id,
    client_secret: `${id}-secret`,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope,
    tenant,
  })),
  extraClientMetadata: { properties: ['tenant'] },
  scopes: ['read', 'write', 'admin'],
  jwks: { keys: [signingKey] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    // JWT access tokens need a resource server: a token with no resource parameter is for
    // ragapi's audience.
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        if (resource !== audience && resource !== otherAudience) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: 'read write admin',
          audience: resource,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: (ctx) => ({ tenant: ctx.oidc.client.tenant }),
  // Swagger UI's Authorize dialog, on ragapi's origin, asks the token endpoint from the browser.
  clientBasedCORS: () => true,
  ttl: {
    ClientCredentials: (ctx, token, client) => (client.clientId === 'acme-short-lived' ? 1 : 600),
  },
});

let jwksRequests = 0;
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/jwks-requests') {
    ctx.body = { count: jwksRequests };
    return;
  }
  if (ctx.path === '/jwks') {
    jwksRequests += 1;
  }
  await next();
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});
