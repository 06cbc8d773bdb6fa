"""The soak's reuse attacker (`service.loadtest.soak`): every second it logs in, refreshes
once and presents the first refresh token again, expecting REFRESH_TOKEN_REUSED; at the
end it checks that every attacked session's newest access token fails Validate with
REVOKED. What it saw is kept in an `AttackLog`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import grpc
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ATTACK_INTERVAL = 1.0  # seconds between reuse attacks
CALL_TIMEOUT = 10.0  # seconds: no single gRPC call of the soak may hang longer


def code_and_reason(error: grpc.RpcError) -> tuple[str, str]:
    """The status code name and the ErrorInfo reason ("" if none) of a failed call."""
    call = cast(grpc.Call, error)
    code = call.code().name
    reason = ""
    with contextlib.suppress(Exception):
        status = rpc_status.from_call(call)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
    return code, reason


_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


@dataclass
class Attack:
    session_id: str
    access_token: str  # of the child: the session's newest access token
    revoked_at: float  # time.monotonic() when the replay was refused (the session revoked)


@dataclass
class AttackLog:
    attacks: list[Attack] = field(default_factory=list)
    abandoned: int = 0  # attempts cut short by an outage (retried a second later)
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> count
    anomalies: list[str] = field(default_factory=list)  # outcomes that break the contract


class Attacker:
    """Every second: log in, refresh once, replay the first refresh token."""

    def __init__(
        self,
        target: str,
        username: str,
        password: str,
        on_attack: Callable[[Attack], None] | None = None,
    ) -> None:
        self._on_attack = on_attack
        self._channel = grpc.insecure_channel(target)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._username = username
        self._password = password
        self.log = AttackLog()

    def close(self) -> None:
        self._channel.close()

    def _record(self, error: grpc.RpcError) -> tuple[str, str]:
        code, reason = code_and_reason(error)
        self.log.errors[code] += 1
        return code, reason

    def attack_once(self, deadline: float) -> None:
        credentials = auth_pb2.PasswordCredentials(username=self._username, password=self._password)
        try:
            issued: auth_pb2.IssueResponse = self._stub.Issue(
                auth_pb2.IssueRequest(password=credentials), timeout=CALL_TIMEOUT
            )
            first = issued.tokens
            rotated: auth_pb2.RefreshResponse = self._stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=first.refresh_token), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as error:
            code, reason = self._record(error)
            if code in _RETRYABLE:
                self.log.abandoned += 1
            else:
                self.log.anomalies.append(f"login or first refresh failed: {code} {reason}")
            return
        child = rotated.tokens
        # The replay: retried while the server is unreachable (it may have committed the
        # revocation and lost the answer, so SESSION_REVOKED is then fine too).
        retried = False
        while True:
            try:
                replayed: auth_pb2.RefreshResponse = self._stub.Refresh(
                    auth_pb2.RefreshRequest(refresh_token=first.refresh_token),
                    timeout=CALL_TIMEOUT,
                )
            except grpc.RpcError as error:
                code, reason = self._record(error)
                if code == "UNAUTHENTICATED" and (
                    reason == "REFRESH_TOKEN_REUSED" or (retried and reason == "SESSION_REVOKED")
                ):
                    attack = Attack(child.session_id, child.access_token, time.monotonic())
                    self.log.attacks.append(attack)
                    if self._on_attack is not None:
                        self._on_attack(attack)
                    return
                if code in _RETRYABLE and time.monotonic() < deadline:
                    retried = True
                    time.sleep(0.2)
                    continue
                if code in _RETRYABLE:
                    self.log.abandoned += 1
                    return
                self.log.anomalies.append(
                    f"replay in session {child.session_id}: {code} {reason} "
                    "(want UNAUTHENTICATED REFRESH_TOKEN_REUSED)"
                )
                return
            self.log.anomalies.append(
                f"replay in session {child.session_id} succeeded "
                f"(session {replayed.tokens.session_id}): a rotated token was accepted again"
            )
            return

    def run(self, stop: threading.Event, deadline: float) -> None:
        next_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < deadline:
            self.attack_once(deadline)
            next_at += ATTACK_INTERVAL
            stop.wait(max(0.0, next_at - time.monotonic()))

    def revoked_verdicts(self) -> dict[str, str]:
        """Attacked sessions whose newest access token does not fail Validate with REVOKED."""
        problems: dict[str, str] = {}
        for attack in self.log.attacks:
            try:
                verdict: auth_pb2.ValidateResponse = self._stub.Validate(
                    auth_pb2.ValidateRequest(access_token=attack.access_token),
                    timeout=CALL_TIMEOUT,
                )
            except grpc.RpcError as error:
                code, reason = self._record(error)
                problems[attack.session_id] = f"Validate failed {code} {reason}"
                continue
            if verdict.valid or verdict.error != auth_pb2.VALIDATION_ERROR_REVOKED:
                problems[attack.session_id] = (
                    "its access token still validates as "
                    f"valid={verdict.valid} error={auth_pb2.ValidationError.Name(verdict.error)}"
                )
        return problems
