// Calling authsvc from Node.js.
//
// Loads protos/auth/v1/auth.proto at run time (no generated code), then:
// a wrong-password login (reading the ErrorInfo reason), a login, Validate,
// Refresh, Validate of the new token, GetJwks, offline verification of the new
// access token with jose, a tampered token that fails offline and online,
// Revoke, and what Validate, offline verification and a LocalValidator (local
// verification with revocations pushed by WatchRevocations) say after it.
//
// Prints one JSON object per step on stdout, never a token. Exits 1 on the
// first step that does not go as expected.
//
// Environment: AUTH_TARGET (default 127.0.0.1:50051), AUTH_USERNAME,
// AUTH_PASSWORD, AUTH_ISSUER and AUTH_AUDIENCE (the server's defaults:
// "authsvc"), AUTH_DEADLINE_MS (per call, default 5000).

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { createLocalJWKSet, decodeProtectedHeader, jwtVerify } from "jose";
import protobuf from "protobufjs";

import { LocalValidator } from "./local_validator.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = path.resolve(here, "../../protos");

const target = process.env.AUTH_TARGET || "127.0.0.1:50051";
const username = process.env.AUTH_USERNAME;
const password = process.env.AUTH_PASSWORD;
const issuer = process.env.AUTH_ISSUER || "authsvc";
const audience = process.env.AUTH_AUDIENCE || "authsvc";
const deadlineMs = Number(process.env.AUTH_DEADLINE_MS || 5000);

// --- output --------------------------------------------------------------

// The step under way, named in the failure line if something throws.
let currentStep = "config";

function begin(step) {
  currentStep = step;
}

function report(step, fields = {}) {
  process.stdout.write(JSON.stringify({ step, ok: true, ...fields }) + "\n");
}

class StepFailed extends Error {
  constructor(step, message, fields = {}) {
    super(message);
    this.step = step;
    this.fields = fields;
  }
}

function expect(step, condition, message, fields = {}) {
  if (!condition) throw new StepFailed(step, message, fields);
}

// --- the service ---------------------------------------------------------

// keepCase: false turns access_token into accessToken; enums as their names;
// int64 (Timestamp.seconds) as strings; unset fields (valid: false) present.
const packageDefinition = protoLoader.loadSync("auth/v1/auth.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const auth = grpc.loadPackageDefinition(packageDefinition).auth.v1;
const client = new auth.AuthService(target, grpc.credentials.createInsecure());

// One unary call as a promise, with a deadline on every call.
function call(method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + deadlineMs }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

// Failed calls carry a google.rpc.Status in the "grpc-status-details-bin"
// trailer, with a google.rpc.ErrorInfo whose reason is what to branch on.
// The three messages are declared here (same field numbers as googleapis'
// google/rpc/status.proto and error_details.proto) and decoded with protobufjs,
// which @grpc/proto-loader already depends on.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: {
              fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } },
            },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const RpcStatus = rpcTypes.lookupType("google.rpc.Status");
const ErrorInfo = rpcTypes.lookupType("google.rpc.ErrorInfo");

function errorInfo(err) {
  const raw = err.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return null;
  const status = RpcStatus.decode(raw);
  for (const detail of status.details) {
    if (detail.type_url === "type.googleapis.com/google.rpc.ErrorInfo") {
      const info = ErrorInfo.decode(detail.value);
      return { reason: info.reason, domain: info.domain };
    }
  }
  return null;
}

const codeName = (code) => Object.keys(grpc.status).find((name) => grpc.status[name] === code);

// A call that must fail with `code`; returns the ErrorInfo reason.
async function expectFailure(step, method, request, code, reason) {
  try {
    await call(method, request);
  } catch (err) {
    const info = errorInfo(err);
    const got = { code: codeName(err.code), reason: info?.reason ?? null, domain: info?.domain };
    const wanted = `expected ${codeName(code)}/${reason}, got: ${err.details}`;
    expect(step, err.code === code && got.reason === reason, wanted, got);
    return got;
  }
  throw new StepFailed(step, `${method} succeeded but should have failed`);
}

const isoTime = (ts) => (ts ? new Date(Number(ts.seconds) * 1000).toISOString() : null);

// --- offline verification ------------------------------------------------

async function verifyOffline(token, jwks) {
  // Only the algorithms the service's keys declare: never "none", never HMAC.
  const algorithms = [...new Set(jwks.keys.map((key) => key.alg))];
  return jwtVerify(token, createLocalJWKSet(jwks), {
    issuer,
    audience,
    typ: "at+jwt",
    algorithms,
    requiredClaims: ["sub", "sid", "jti", "iat", "exp"],
  });
}

// The same token with a different "sub" and the original signature.
function tampered(token) {
  const [header, payload, signature] = token.split(".");
  const claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
  claims.sub = "mallory";
  return [header, Buffer.from(JSON.stringify(claims)).toString("base64url"), signature].join(".");
}

// --- the walk-through ----------------------------------------------------

async function main() {
  expect("config", username && password, "set AUTH_USERNAME and AUTH_PASSWORD");
  const login = (pw) => ({ password: { username, password: pw } });

  begin("issue_wrong_password");
  // A wrong password: UNAUTHENTICATED with reason INVALID_CREDENTIALS.
  const wrong = await expectFailure(
    "issue_wrong_password",
    "Issue",
    login(password + "-wrong"),
    grpc.status.UNAUTHENTICATED,
    "INVALID_CREDENTIALS",
  );
  report("issue_wrong_password", wrong);

  begin("issue");
  const first = (await call("Issue", login(password))).tokens;
  expect("issue", first.accessToken && first.refreshToken, "no tokens in IssueResponse");
  report("issue", {
    session_id: first.sessionId,
    token_type: first.tokenType,
    scopes: first.scopes,
    access_token_expires_at: isoTime(first.accessTokenExpiresAt),
    refresh_token_expires_at: isoTime(first.refreshTokenExpiresAt),
  });

  begin("validate");
  const checked = await call("Validate", { accessToken: first.accessToken });
  expect("validate", checked.valid, "Validate said the new token is not valid", {
    error: checked.error,
  });
  expect("validate", checked.sessionId === first.sessionId, "Validate names another session");
  report("validate", {
    valid: checked.valid,
    subject: checked.subject,
    session_id: checked.sessionId,
    scopes: checked.scopes,
    expires_at: isoTime(checked.expiresAt),
  });

  begin("refresh");
  const second = (await call("Refresh", { refreshToken: first.refreshToken })).tokens;
  const rotated = {
    same_session: second.sessionId === first.sessionId,
    access_token_changed: second.accessToken !== first.accessToken,
    refresh_token_changed: second.refreshToken !== first.refreshToken,
  };
  expect("refresh", Object.values(rotated).every(Boolean), "Refresh did not rotate", rotated);
  report("refresh", {
    ...rotated,
    session_id: second.sessionId,
    access_token_expires_at: isoTime(second.accessTokenExpiresAt),
  });

  begin("validate_refreshed");
  const recheck = await call("Validate", { accessToken: second.accessToken });
  expect("validate_refreshed", recheck.valid, "the refreshed token is not valid", {
    error: recheck.error,
  });
  expect("validate_refreshed", recheck.subject === checked.subject, "another subject");
  report("validate_refreshed", {
    valid: recheck.valid,
    subject: recheck.subject,
    session_id: recheck.sessionId,
    expires_at: isoTime(recheck.expiresAt),
  });

  begin("jwks");
  const jwks = JSON.parse((await call("GetJwks", {})).jwksJson);
  expect("jwks", Array.isArray(jwks.keys) && jwks.keys.length > 0, "empty JWK Set");
  report("jwks", { kids: jwks.keys.map((key) => key.kid), algs: jwks.keys.map((key) => key.alg) });

  begin("verify_offline");
  const { payload, protectedHeader } = await verifyOffline(second.accessToken, jwks);
  const agrees = payload.sub === recheck.subject && payload.sid === recheck.sessionId;
  expect("verify_offline", agrees, "the offline claims differ from Validate's");
  report("verify_offline", {
    verified: true,
    kid: protectedHeader.kid,
    alg: protectedHeader.alg,
    typ: protectedHeader.typ,
    subject: payload.sub,
    session_id: payload.sid,
    issuer: payload.iss,
    audience: payload.aud,
    scope: payload.scope,
    expires_at: new Date(payload.exp * 1000).toISOString(),
    matches_validate: agrees,
  });

  begin("verify_local");
  // Local verification that also knows revocations: it follows WatchRevocations.
  const local = new LocalValidator(client, { issuer, audience });
  await local.start();
  const locally = await local.validate(second.accessToken);
  expect("verify_local", locally.valid && locally.sessionId === recheck.sessionId,
    "the local validator disagrees with Validate", { error: locally.error });
  report("verify_local", {
    valid: locally.valid,
    subject: locally.subject,
    session_id: locally.sessionId,
    matches_validate: locally.subject === recheck.subject,
    sequence: local.sequence,
  });

  begin("verify_tampered");
  const forged = tampered(second.accessToken);
  let offlineError = null;
  try {
    await verifyOffline(forged, jwks);
  } catch (err) {
    offlineError = err.code ?? err.name;
  }
  expect("verify_tampered", offlineError !== null, "a tampered token verified offline");
  const online = await call("Validate", { accessToken: forged });
  expect("verify_tampered", !online.valid, "Validate accepted a tampered token");
  report("verify_tampered", {
    rejected_offline: true,
    offline_error: offlineError,
    kid: decodeProtectedHeader(forged).kid,
    valid_online: online.valid,
    online_error: online.error,
  });

  begin("revoke");
  const revoked = await call("Revoke", { refreshToken: second.refreshToken });
  expect("revoke", revoked.revokedSessions === 1, "Revoke did not end the session", {
    revoked_sessions: revoked.revokedSessions,
  });
  report("revoke", { revoked_sessions: revoked.revokedSessions, session_id: second.sessionId });

  begin("validate_after_revoke");
  const after = await call("Validate", { accessToken: second.accessToken });
  expect("validate_after_revoke", !after.valid && after.error === "VALIDATION_ERROR_REVOKED",
    "Validate still accepts the token of a revoked session", { valid: after.valid, error: after.error });
  report("validate_after_revoke", { valid: after.valid, error: after.error });

  begin("local_after_revoke");
  // The revocation reaches the local validator through the stream, without a call.
  const revokedAt = Date.now();
  let localAfter = await local.validate(second.accessToken);
  while (localAfter.valid && Date.now() - revokedAt < 2000) {
    await new Promise((resolve) => setTimeout(resolve, 5));
    localAfter = await local.validate(second.accessToken);
  }
  expect("local_after_revoke", !localAfter.valid && localAfter.error === "VALIDATION_ERROR_REVOKED",
    "the local validator still accepts the token of a revoked session", { error: localAfter.error });
  report("local_after_revoke", {
    valid: localAfter.valid,
    error: localAfter.error,
    within_ms: Date.now() - revokedAt,
    fallbacks: local.stats.fallbacks,
  });
  local.close();

  begin("offline_after_revoke");
  // Plain offline verification cannot know about the revoke: the signature and
  // the claims are still fine until "exp". Use Validate or a LocalValidator.
  const stillVerifies = await verifyOffline(second.accessToken, jwks).then(() => true, () => false);
  report("offline_after_revoke", {
    still_verifies_offline: stillVerifies,
    note: "plain offline verification cannot see revocations; Validate and LocalValidator can",
  });

  begin("refresh_after_revoke");
  const again = await expectFailure(
    "refresh_after_revoke",
    "Refresh",
    { refreshToken: second.refreshToken },
    grpc.status.UNAUTHENTICATED,
    "SESSION_REVOKED",
  );
  report("refresh_after_revoke", again);

  report("done");
}

try {
  await main();
} catch (err) {
  const failure =
    err instanceof StepFailed
      ? { step: err.step, ok: false, error: err.message, ...err.fields }
      : {
          step: currentStep,
          ok: false,
          error: err.message,
          // A gRPC status name, or a jose error code such as ERR_JWT_CLAIM_VALIDATION_FAILED.
          code: typeof err.code === "number" ? codeName(err.code) : (err.code ?? err.name),
          reason: errorInfo(err)?.reason ?? null,
          claim: err.claim,
        };
  process.stdout.write(JSON.stringify(failure) + "\n");
  process.exitCode = 1;
} finally {
  client.close();
}
