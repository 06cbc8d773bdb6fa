// Validating authsvc access tokens in this process, with revocations pushed by
// authsvc: the same answers as the Validate RPC without a call per request.
//
// The validator follows AuthService.WatchRevocations: the first update is a
// snapshot (every revoked session and user whose tokens may still be alive,
// and the JWK Set), then the revocations as they happen, in order, and a
// heartbeat at least every second. On a dropped stream it reconnects with
// jittered exponential backoff and resumes after the last sequence it applied.
// If it has heard nothing for longer than maxStalenessMs it stops answering from
// memory: it asks the server's Validate (or, with failClosed, answers not valid
// with VALIDATION_ERROR_VERIFIER_STALE).

import * as grpc from "@grpc/grpc-js";
import { createLocalJWKSet, errors as joseErrors, jwtVerify } from "jose";

const INITIAL_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5000;

const toMillis = (ts) => (ts ? Number(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6) : 0);

// The Validate RPC's answer for a token that is not valid.
const refusal = (error) => ({ valid: false, error, subject: "", sessionId: "", scopes: [] });

// jose's errors, as the server's ValidationError names them.
function validationError(err) {
  if (err instanceof joseErrors.JWTExpired) return "VALIDATION_ERROR_EXPIRED";
  if (err instanceof joseErrors.JWTClaimValidationFailed) {
    if (err.claim === "nbf" || err.claim === "iat") return "VALIDATION_ERROR_NOT_YET_VALID";
    if (err.claim === "aud") return "VALIDATION_ERROR_WRONG_AUDIENCE";
    return "VALIDATION_ERROR_MALFORMED";
  }
  if (
    err instanceof joseErrors.JWSSignatureVerificationFailed ||
    err instanceof joseErrors.JWKSNoMatchingKey ||
    err instanceof joseErrors.JOSEAlgNotAllowed
  ) {
    return "VALIDATION_ERROR_BAD_SIGNATURE";
  }
  return "VALIDATION_ERROR_MALFORMED";
}

export class LocalValidator {
  // client: an auth.v1.AuthService client (grpc-js, from proto-loader with
  // keepCase: false, longs: String, enums: String). issuer, audience: what the
  // server's AUTH_ISSUER and AUTH_AUDIENCE are.
  constructor(client, { issuer, audience, maxStalenessMs = 5000, failClosed = false, metadata } = {}) {
    this.client = client;
    this.issuer = issuer;
    this.audience = audience;
    this.maxStalenessMs = maxStalenessMs;
    this.failClosed = failClosed;
    this.metadata = metadata ?? new grpc.Metadata();
    this.sequence = "0";
    this.revokedSessions = new Map(); // session id -> keep until (ms)
    this.revokedUsers = new Map(); // subject -> { generation, keepUntil }
    this.pending = null; // a snapshot being received in parts
    this.keys = null;
    this.algorithms = [];
    this.lastHeard = 0;
    this.stats = { updates: 0, snapshots: 0, reconnects: 0, fallbacks: 0 };
    this.closed = false;
    this.stream = null;
    this.backoffMs = INITIAL_BACKOFF_MS;
  }

  // Resolves once the first snapshot is in.
  start(timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no snapshot from WatchRevocations")), timeoutMs);
      this.onFirstSnapshot = () => {
        clearTimeout(timer);
        resolve();
      };
      this.connect();
    });
  }

  close() {
    this.closed = true;
    this.stream?.cancel();
  }

  // Milliseconds since the last update or heartbeat.
  get stalenessMs() {
    return this.lastHeard ? Date.now() - this.lastHeard : Infinity;
  }

  connect() {
    if (this.closed) return;
    const stream = this.client.WatchRevocations({ afterSequence: this.sequence }, this.metadata);
    this.stream = stream;
    this.pending = null; // a snapshot cut short by a dropped stream is dropped with it
    stream.on("data", (update) => this.apply(update));
    // "error" follows a failed or cancelled stream; "end" a server that closed it.
    const again = () => {
      if (this.stream !== stream || this.closed) return;
      this.stream = null;
      this.stats.reconnects += 1;
      const delay = Math.random() * this.backoffMs; // full jitter
      this.backoffMs = Math.min(this.backoffMs * 2, MAX_BACKOFF_MS);
      setTimeout(() => this.connect(), delay);
    };
    stream.on("error", again);
    stream.on("end", again);
  }

  apply(update) {
    this.lastHeard = Date.now();
    this.backoffMs = INITIAL_BACKOFF_MS;
    if (update.jwksJson) {
      const jwks = JSON.parse(update.jwksJson);
      this.keys = createLocalJWKSet(jwks);
      this.algorithms = [...new Set(jwks.keys.map((key) => key.alg))];
    }
    // A large snapshot comes in parts: the first says snapshot, the parts before the
    // last carry sequence 0, the last one the sequence. Held aside until complete.
    if (update.snapshot) this.pending = { sessions: new Map(), users: new Map() };
    const target = this.pending ?? { sessions: this.revokedSessions, users: this.revokedUsers };
    if (!this.pending && update.sequence === "0") return; // a heartbeat
    for (const revoked of update.revoked) {
      target.sessions.set(revoked.sessionId, toMillis(revoked.keepUntil));
    }
    for (const user of update.revokedUsers) {
      const held = target.users.get(user.subject);
      const generation = Number(user.generation);
      if (!held || held.generation < generation) {
        target.users.set(user.subject, { generation, keepUntil: toMillis(user.keepUntil) });
      }
    }
    if (update.sequence === "0") return; // more parts of the snapshot follow
    if (this.pending) {
      this.revokedSessions = this.pending.sessions;
      this.revokedUsers = this.pending.users;
      this.pending = null;
      this.stats.snapshots += 1;
    }
    this.sequence = update.sequence;
    this.stats.updates += 1;
    this.forgetExpired();
    if (this.onFirstSnapshot && this.stats.snapshots > 0) {
      this.onFirstSnapshot();
      this.onFirstSnapshot = null;
    }
  }

  forgetExpired() {
    const now = Date.now();
    for (const [sessionId, keepUntil] of this.revokedSessions) {
      if (keepUntil < now) this.revokedSessions.delete(sessionId);
    }
    for (const [subject, held] of this.revokedUsers) {
      if (held.keepUntil < now) this.revokedUsers.delete(subject);
    }
  }

  // The Validate RPC's answer, from memory while the stream is fresh.
  async validate(token, { requiredScopes = [], audience = this.audience } = {}) {
    if (this.stalenessMs > this.maxStalenessMs || !this.keys) {
      this.stats.fallbacks += 1;
      if (this.failClosed) return refusal("VALIDATION_ERROR_VERIFIER_STALE");
      return this.validateRemotely(token, requiredScopes, audience);
    }
    let verified;
    try {
      verified = await jwtVerify(token, this.keys, {
        issuer: this.issuer,
        typ: "at+jwt",
        algorithms: this.algorithms,
        requiredClaims: ["sub", "sid", "jti", "iat", "exp"],
      });
    } catch (err) {
      return refusal(validationError(err));
    }
    const claims = verified.payload;
    const revokedUser = this.revokedUsers.get(claims.sub);
    if (
      this.revokedSessions.has(claims.sid) ||
      (revokedUser && (claims.ugen ?? 0) < revokedUser.generation)
    ) {
      return refusal("VALIDATION_ERROR_REVOKED");
    }
    const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (audience && !audiences.includes(audience)) return refusal("VALIDATION_ERROR_WRONG_AUDIENCE");
    const scopes = (claims.scope ?? "").split(" ").filter(Boolean);
    if (!requiredScopes.every((scope) => scopes.includes(scope))) {
      return refusal("VALIDATION_ERROR_INSUFFICIENT_SCOPE");
    }
    return {
      valid: true,
      error: "VALIDATION_ERROR_UNSPECIFIED",
      subject: claims.sub,
      sessionId: claims.sid,
      scopes,
      expiresAt: new Date(claims.exp * 1000),
      tokenId: claims.jti,
    };
  }

  validateRemotely(token, requiredScopes, audience) {
    return new Promise((resolve, reject) => {
      const request = { accessToken: token, requiredScopes, audience: audience ?? "" };
      this.client.Validate(request, this.metadata, { deadline: Date.now() + 5000 }, (err, answer) => {
        if (err) return reject(err);
        resolve({ ...answer, expiresAt: answer.expiresAt ? new Date(toMillis(answer.expiresAt)) : null });
      });
    });
  }
}
