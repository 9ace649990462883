"""The aggregator's credentials gate: what drivers sent this instance, and the calls waiting for it.

Credentials never travel through the actor's constructor (Ray keeps it and replays it on every
restart): a driver's handle sends them with ``set_credentials``, and its watcher sends them again
as soon as Ray restarts the actor (:mod:`.handle`). Until then a call that needs the storage
tries the node's own credentials (at most every :data:`NODE_CREDENTIALS_RETRY_S`), then waits up
to :data:`CREDENTIALS_WAIT_S` for a driver's; a worker asking for its ``worker_env`` values waits
up to :data:`WORKER_ENV_WAIT_S`, but not for the storage. The values are held in memory only:
never logged, returned or persisted. Used by the actor (:mod:`art_ray_metrics.distributed.actor`),
whose boot opens the storage with them; no Ray here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from art_ray_metrics.errors import (
    ConditionalWritesUnsupportedError,
    ConfigError,
    CredentialsRequiredError,
    FencedError,
    StorageError,
)

__all__ = [
    "CREDENTIALS_WAIT_S",
    "NODE_CREDENTIALS_RETRY_S",
    "WORKER_ENV_WAIT_S",
    "CredentialGate",
]

CREDENTIALS_WAIT_S = 5.0
"""How long a call that needs the storage waits in a restarted actor for the driver's handle to
send credentials (its watcher does so at once) before answering CredentialsRequiredError."""
WORKER_ENV_WAIT_S = 15.0
"""How long :meth:`CredentialGate.worker_env` waits for a driver's values on a restarted
instance (within the worker's own bound, ``workerenv.FETCH_TIMEOUT_S``): a restart on a loaded
machine can take longer than the storage's wait."""

NODE_CREDENTIALS_RETRY_S = 30.0
"""A restarted actor whose node's own credentials could not open the storage tries them again
after this long (a call meanwhile waits for the driver's instead)."""


class _Arrival:
    """Something a driver sends an instance: calls wait for it (bounded) until it is woken."""

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None  # created by the first waiter, on the loop

    async def wait(self, timeout_s: float) -> None:
        if self.event is None:
            self.event = asyncio.Event()
        event = self.event
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout_s)
        except TimeoutError:
            pass

    def wake(self) -> bool:
        """Wake the calls waiting; whether there were any."""
        event, self.event = self.event, None
        if event is None:
            return False
        event.set()
        return True


class CredentialGate:
    """One actor instance's credentials and whether its storage is open (see the module).

    Args:
        storage_uri: The storage, as named to the caller when it cannot be opened.
        boot: Opens the storage with :attr:`values` and builds the stages, trying the storage
            ``attempts`` times; raises :class:`StorageError` or :class:`ConfigError` when the
            credentials cannot open it.

    Attributes:
        values: The credential variables a driver sent (empty: the node's own).
        booted: The storage is open and the stages built.
        received: A driver's handle sent credentials that opened the storage.
        env_received: A driver sent this instance its values (the workers' ``worker_env``).
    """

    def __init__(self, storage_uri: str | None, boot: Callable[[int], None]) -> None:
        self.storage_uri = storage_uri
        self.boot = boot
        self.values: dict[str, str] = {}  # in memory only: never logged or persisted
        self.booted = False
        self.received = False
        self.env_received = False  # the workers' variables do not wait for the storage
        self.node_retry_at = 0.0  # when the node's own credentials may be tried again
        self.boot_error = ""  # why they could not open the storage (no values in it)
        self.credentials_sent = _Arrival()
        self.env_sent = _Arrival()

    def open(self, attempts: int = 6) -> None:
        """Open the storage now; its errors propagate as they are."""
        self.boot(attempts)
        self.booted = True

    def ensure(self) -> None:
        """Open, check, claim and restore the storage once, with the credentials in hand.

        Raises:
            CredentialsRequiredError: The storage cannot be opened with the credentials this
                process has (the node's environment or identity, or what a driver sent).
        """
        if self.booted:
            return
        try:
            self.open(attempts=1)  # fail fast: the driver's handle answers with credentials
        except (FencedError, ConditionalWritesUnsupportedError):
            raise
        except (StorageError, ConfigError) as exc:
            self.boot_error = " ".join(str(exc).split())[:300]
            raise CredentialsRequiredError(self._required()) from exc

    def _required(self) -> str:
        return (
            f"The aggregator cannot open {self.storage_uri} with the credentials it "
            f"has ({self.boot_error}); the driver's handle sends them with set_credentials"
        )

    async def wait(self) -> None:
        """Open the storage before a call that needs it, in a (re)started actor.

        The node's own credentials are tried first (at most every
        :data:`NODE_CREDENTIALS_RETRY_S`); if they cannot open it, the call waits up to
        :data:`CREDENTIALS_WAIT_S` for a driver's handle to send credentials: its watcher
        (the actor's ``credentials_wanted``) does so as soon as this instance starts, so
        rollouts flushing across a restart never wait for the trainer's next call.

        Raises:
            CredentialsRequiredError: No credentials that open the storage arrived in time.
        """
        if self.booted:
            return
        if time.monotonic() >= self.node_retry_at:
            try:
                self.ensure()
                return
            except CredentialsRequiredError:
                self.node_retry_at = time.monotonic() + NODE_CREDENTIALS_RETRY_S
        await self.credentials_sent.wait(CREDENTIALS_WAIT_S)
        if not self.booted:
            raise CredentialsRequiredError(self._required())

    async def keep(self, env: Mapping[str, str]) -> None:
        """A driver sent ``env``: hold it (an empty one does not wipe another driver's once the
        storage is open), and answer the workers waiting for their variables before the storage
        is opened (which blocks the loop; a restart's restore can take seconds)."""
        if env or not self.booted:
            self.values = {str(k): str(v) for k, v in env.items()}
        if not self.env_received:
            self.env_received = True
            if self.env_sent.wake():
                await asyncio.sleep(0)

    def opened(self) -> None:
        """A driver's credentials opened the storage: wake the calls waiting for them."""
        self.received = True
        self.credentials_sent.wake()

    async def wanted(self, wait_s: float) -> bool:
        """True at once while no driver has sent credentials to this instance, else whether
        none has after ``wait_s`` seconds (at most a minute)."""
        if not self.received:
            return True
        await asyncio.sleep(max(0.0, min(float(wait_s), 60.0)))
        return not self.received

    async def worker_env(self, names: tuple[str, ...]) -> dict[str, str]:
        """The values of ``names`` a driver sent, after waiting (bounded) for one to send any.

        Raises:
            CredentialsRequiredError: Names are asked for but no driver sent values in time.
        """
        if names and not self.env_received:
            await self.env_sent.wait(WORKER_ENV_WAIT_S)
            if not self.env_received:
                raise CredentialsRequiredError(
                    "No driver has sent the worker_env values to this aggregator yet (its "
                    "handle does so at start_aggregator and after every restart)"
                )
        return {k: self.values[k] for k in names if k in self.values}
