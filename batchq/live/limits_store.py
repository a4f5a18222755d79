"""Shared limits: one account's pace kept in Redis for every process that names it.

**What is shared.** Each limit kind (requests, tokens) has one *theoretical
arrival time* in a Redis hash: the generic cell rate algorithm of
``limiter.Pace``, but on the store's clock (``TIME``) and for every process
at once. A Lua script books units on it atomically. The hash also holds the
pause that a 429 (or ``x-ratelimit-remaining-*: 0``) asks for, the pace after
the last cut and when it was cut (the pace climbs back from it by a
twentieth of the ceiling a second, computed when asked: no process has to
be alive to make it climb), and an *epoch* bumped by every pause and cut, so
each process learns that the units it holds were voided.

**Not on every request's path.** A process books a *block* of units per
round trip: ``BLOCK_SECONDS`` of its pace (5 requests at 6,000 RPM), or what
one request needs if more. A block is a stretch of the shared timeline; the
``Ledger`` hands its units out locally, each at its own due time, so the
endpoint still sees one smooth pace however the blocks interleave. A worker
waits for the store only when the ledger is empty, and then one worker asks
for all of them. Units that pass unused are lost, as in any GCRA.

**Never far ahead.** The store books nothing that would start more than
``HORIZON_SECONDS`` after its now: it answers with the wait instead, and the
process asks again when the timeline has come that close. Without this, every
worker waiting for its turn would hold a unit booked for it, and a pool sized
for the account's whole pace books seconds ahead: a process killed then takes
all those seconds of its bookings with it, and the others wait them out. So a
process that dies holds at most ``HORIZON_SECONDS`` plus one block of the
account.

**Liveness.** Every process adds itself to a sorted set with an expiry
``HEARTBEAT_TTL`` seconds ahead, renewed every ``HEARTBEAT_SECONDS``; the
count of live members is the number of processes sharing the account. All
keys expire ``KEY_TTL`` seconds after their last use.

**Losing the store.** A process that cannot reach Redis mid-job says so
once and goes on alone with the limit divided by the number of processes it
last saw (``share``), never with the whole limit. It tries the store again
every ``RECONNECT_SECONDS`` and, once it answers, says so and books from it
again: a restarted Redis (empty, without persistence) starts the shared pace
afresh, without a burst, as a first process does. The loss closes every
connection of the client's pool: one left open to the Redis that went away
would take the next command after the store came back, and lose it again.

The ``redis`` package is imported only when a store is named, so runs
without one start as fast as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchq.config import LIMITS_STORE_PASSWORD_ENV, strip_secrets
from batchq.errors import LimitsStoreError, Notify

if TYPE_CHECKING:  # pragma: no cover
    from batchq.live.limiter import Kind

BLOCK_SECONDS = 0.05  # of a process's pace, booked per round trip to the store
HORIZON_SECONDS = 0.1  # nothing is booked to start later than this after the store's now
GRACE_SECONDS = 0.02  # a unit this late is still used: the time from the grant to the worker
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_TTL = 3.0  # a process not heard from for this long no longer counts
KEY_TTL_MS = 120_000  # every key expires this long after its last use
TIMEOUT = 2.0  # seconds for one command: longer, and the store counts as lost
RECONNECT_SECONDS = 3.0  # while lost, how often the store is tried again
INCREASE_PER_SECOND = 0.05  # of the ceiling, after a cut (as limiter.INCREASE_PER_SECOND)
DECREASE = 0.5
MIN_RATE_SHARE = 0.01

# KEYS[1]: the hash. ARGV: kind, amount, ceiling (units/s), key TTL (ms), horizon (s).
# Returns the booked start relative to the store's now, the pace, the epoch, and 1; or,
# when that start is more than the horizon away, books nothing and returns 0 last.
_GRANT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local kind, amount, ceiling = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'tat:' .. kind, 'base:' .. kind, 'cut:' .. kind,
                     'pause', 'epoch')
local tat, base, cut = tonumber(h[1]) or 0, tonumber(h[2]), tonumber(h[3]) or 0
local pause, epoch = tonumber(h[4]) or 0, tonumber(h[5]) or 0
local rate = ceiling
if base then rate = math.min(ceiling, base + ceiling * @INC@ * (now - cut)) end
local start = math.max(tat, now, pause)
local booked = 0
if start - now <= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'tat:' .. kind, string.format('%.6f', start + amount / rate))
  booked = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {string.format('%.6f', start - now), string.format('%.6f', rate), epoch, booked}
"""

# ARGV: kind ('' = none), age of the request that got a 429 (s), ceiling, pause (s), TTL.
# A cut for a request sent before the last cut of its kind is the same episode: no cut.
_SLOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local kind, age, ceiling = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local until_ = now + tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'pause', 'base:' .. kind, 'cut:' .. kind)
local pause = tonumber(h[1]) or 0
local changed = false
if until_ > pause then
  pause = until_
  redis.call('HSET', KEYS[1], 'pause', string.format('%.6f', pause))
  changed = true
end
if kind ~= '' and now - age > (tonumber(h[3]) or -1) then
  local rate = ceiling
  if h[2] then
    rate = math.min(ceiling, tonumber(h[2]) + ceiling * @INC@ * (now - tonumber(h[3])))
  end
  rate = math.max(rate * @DEC@, ceiling * @MIN@)
  redis.call('HSET', KEYS[1], 'base:' .. kind, string.format('%.6f', rate),
             'cut:' .. kind, string.format('%.6f', now))
  changed = true
end
if changed then
  local at = string.format('%.6f', math.max(now, pause))
  redis.call('HSET', KEYS[1], 'tat:requests', at, 'tat:tokens', at)
  redis.call('HINCRBY', KEYS[1], 'epoch', 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return changed and 1 or 0
"""

# KEYS[1]: the sorted set of live processes. ARGV: this process, its TTL (s), key TTL (ms).
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('ZCARD', KEYS[1])
"""


def _lua(body: str) -> str:
    for name, value in (
        ("@INC@", INCREASE_PER_SECOND),
        ("@DEC@", DECREASE),
        ("@MIN@", MIN_RATE_SHARE),
    ):
        body = body.replace(name, repr(value))
    return body


def default_key(base_url: str, api_key: str | None) -> str:
    """The limit key of an account: its base URL and a hash of its key, never the key.

    Credentials in the base URL (``https://user:pass@host``, ``?api-key=``) are part of the
    account, so they go into the hash, never into the key's name.
    """
    public, secrets = strip_secrets(base_url)
    if not (api_key or secrets):
        return f"{public.rstrip('/')}#no-key"
    secret = "\0".join([api_key or "", *secrets]) if secrets else api_key or ""
    return f"{public.rstrip('/')}#{hashlib.sha256(secret.encode()).hexdigest()[:16]}"


def redact(url: str) -> str:
    """A store URL without its user name and password (also ``?password=``), for a message."""
    return re.sub(r"^(\w+://)[^@/]*@", r"\1", strip_secrets(url)[0])


@dataclass(frozen=True, slots=True)
class Grant:
    """A block of units booked on the shared timeline, or the wait until one can be."""

    delay: float  # seconds from the store's now to the block's start
    rate: float  # units a second within the block: the shared pace
    epoch: int  # the store's epoch when booked
    booked: bool = True  # False: the start is beyond the horizon; ask again then


class Ledger:
    """The units the store granted this process, handed out in order (pure: no I/O).

    Each block is a stretch of the shared timeline, its units due one after
    another at its own rate. Units whose time passed unused are dropped, as a
    local GCRA drops them, so a late worker never bursts; but only once
    ``GRACE_SECONDS`` late, or at a high rate a unit would pass between the
    store's answer and the worker it was booked for.
    """

    __slots__ = ("_blocks", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate  # the shared pace last heard, a second (for display and sizing)
        self._blocks: deque[list[float]] = deque()  # [start, amount, rate, used]

    def grant(self, start: float, amount: float, rate: float) -> None:
        self._blocks.append([start, amount, rate, 0.0])
        self.rate = rate

    def held(self, now: float) -> float:
        """Units still usable from ``now`` on."""
        self._drop_passed(now)
        return sum(b[1] - b[3] for b in self._blocks)

    def reserve(self, amount: float, now: float) -> float | None:
        """Take ``amount`` units; return when they may start (None: not enough held)."""
        if self.held(now) < amount - 1e-9:
            return None
        start = -math.inf
        while amount > 1e-9:
            block = self._blocks[0]
            start = max(start, block[0] + block[3] / block[2])
            take = min(amount, block[1] - block[3])
            block[3] += take
            amount -= take
            if block[1] - block[3] <= 1e-9:
                self._blocks.popleft()
        return max(start, now)

    def used(self, start: float, amount: float) -> None:
        """Nothing to keep: a used unit is gone from the ledger already."""

    def replan(self, at: float) -> None:
        """The store voided every booking: drop the blocks held."""
        self._blocks.clear()

    def _drop_passed(self, now: float) -> None:
        while self._blocks:
            start, amount, rate, used = self._blocks[0]
            passed = (now - GRACE_SECONDS - start) * rate
            if passed >= amount:
                self._blocks.popleft()
                continue
            self._blocks[0][3] = max(used, passed)
            break


class SharedLimits:
    """A connection to the store for one limit key; an async context manager.

    ``grant`` books a block; ``slow_down`` records a pause and a cut for every
    process; ``run`` keeps this process counted. After a failure ``lost`` is
    True and every call is a no-op returning None.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        on_notice: Notify = lambda message, level=logging.INFO: None,
        block_seconds: float | None = None,
        password: str | None = None,
    ) -> None:
        self.url = url
        self._password = password  # when the URL has none (a password in the URL wins)
        self.key = key
        # None: the module's BLOCK_SECONDS when connected (a benchmark may set it to 0)
        self.block_seconds = BLOCK_SECONDS if block_seconds is None else block_seconds
        self.lost = False
        self.processes = 1  # live processes last seen, this one included
        self.epoch: int | None = None
        self.round_trips = 0
        self._on_notice = on_notice
        self._state = f"batchq:limits:{{{key}}}"
        self._members = f"batchq:limits:{{{key}}}:processes"
        self._me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._slow: deque[list[Any]] = deque()
        self._stopped = False
        self._returns = 0  # times the store came back: a call begun before says nothing now
        self._waker: asyncio.Future[None] | None = None

    async def __aenter__(self) -> SharedLimits:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect and count this process in; LimitsStoreError (exit 2) if unreachable."""
        import redis.asyncio  # here, not at the top: runs without a store never load it
        from redis.exceptions import AuthenticationError, RedisError

        try:
            self._redis = redis.asyncio.Redis.from_url(
                self.url,
                password=self._password,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                decode_responses=True,
            )
            for name, body in (("grant", _GRANT), ("slow", _SLOW), ("heartbeat", _HEARTBEAT)):
                self._scripts[name] = self._redis.register_script(_lua(body))
            count = await self._scripts["heartbeat"](
                keys=[self._members], args=[self._me, HEARTBEAT_TTL, KEY_TTL_MS]
            )
            self.processes = max(1, int(count))
        # TypeError: a query parameter redis-py does not know (?foo=1) reaches a constructor
        except (RedisError, OSError, ValueError, TypeError) as exc:
            await self.aclose()
            # job.toml keeps the URL without its password: say where it goes
            needs = isinstance(exc, AuthenticationError) and self._password is None
            hint = f" (its password: {LIMITS_STORE_PASSWORD_ENV})" if needs else ""
            raise LimitsStoreError(
                f"cannot reach the limits store {redact(self.url)}: {_reason(exc)}{hint}"
            ) from None

    async def aclose(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            with contextlib.suppress(Exception):
                if not self.lost:
                    await redis.zrem(self._members, self._me)
            await _disconnect(redis)

    async def grant(self, kind: Kind, amount: float, ceiling: float) -> Grant | None:
        """Book ``amount`` units of ``kind`` at up to ``ceiling`` a second (None: store lost).

        Nothing is booked when they would start more than ``HORIZON_SECONDS`` from now:
        the grant says so (``booked`` False) and when they would start.
        """
        if self.lost:
            return None
        args = [kind, amount, ceiling, KEY_TTL_MS, HORIZON_SECONDS]
        reply = await self._call("grant", [self._state], args)
        if reply is None:
            return None
        self.round_trips += 1
        return Grant(float(reply[0]), float(reply[1]), int(reply[2]), bool(int(reply[3])))

    def slow_down(
        self, pause: float, kind: Kind | None = None, *, age: float = 0.0, ceiling: float = 0.0
    ) -> None:
        """Pause everyone ``pause`` seconds; with a kind, also cut its shared pace.

        Sent by ``run``, in order, without making the caller wait.
        """
        if not self.lost:
            self._slow.append([kind or "", age, ceiling or 1.0, max(pause, 0.0), KEY_TTL_MS])
            self._wake()

    async def run(self) -> None:
        """Send the slow-downs and keep this process counted until ``stop``; while the
        store is lost, try it again now and then.

        Not ``asyncio.timeout`` around a queue: on 3.11 a cancellation that races the timer
        can come out as a TimeoutError, and the job would never end.
        """
        loop = asyncio.get_running_loop()
        beat = loop.time() + HEARTBEAT_SECONDS
        while not self._stopped:
            if self.lost:
                await self._doze(RECONNECT_SECONDS)
                if not self._stopped:
                    await self._reconnect()
                continue
            if self._slow:
                await self._call("slow", [self._state], self._slow.popleft())
                continue
            if loop.time() < beat:
                await self._doze(beat - loop.time())
                continue
            beat = loop.time() + HEARTBEAT_SECONDS
            count = await self._call(
                "heartbeat", [self._members], [self._me, HEARTBEAT_TTL, KEY_TTL_MS]
            )
            if count is not None:
                self.processes = max(1, int(count))

    def stop(self) -> None:
        """End ``run`` (the slow-downs still queued are dropped: the job is over)."""
        self._stopped = True
        self._wake()

    async def _doze(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._waker = waker = loop.create_future()
        timer = loop.call_later(seconds, self._wake)
        try:
            await waker
        finally:
            timer.cancel()
            self._waker = None

    def _wake(self) -> None:
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        returns = self._returns
        try:
            return await self._scripts[name](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            if returns == self._returns:
                await self._lose(exc)
            return None

    async def _lose(self, exc: BaseException) -> None:
        if self.lost:
            return
        self.lost = True
        self._slow.clear()  # pauses asked before the loss would be stale when it is back
        await _disconnect(self._redis)
        self._on_notice(
            f"lost the limits store {redact(self.url)} ({_reason(exc)}): going on alone at "
            f"1/{self.processes} of the limits, the share of the {self.processes} "
            f"process(es) last seen, and trying it again every {RECONNECT_SECONDS:g} s",
            logging.WARNING,
        )

    async def _reconnect(self) -> None:
        """Try the lost store once (the client connects afresh); on an answer, share again."""
        from redis.exceptions import RedisError

        try:
            count = await self._scripts["heartbeat"](
                keys=[self._members], args=[self._me, HEARTBEAT_TTL, KEY_TTL_MS]
            )
        except (RedisError, OSError):
            return
        self.processes = max(1, int(count))
        self.lost = False
        self._returns += 1
        self._on_notice(f"the limits store {redact(self.url)} is back: sharing the limits again")


async def _disconnect(redis: Any) -> None:
    """Close every connection of the client's pool; the next command opens a new one.

    The pool's ``disconnect``, not the client's ``aclose``: redis 5.0.0, the floor, has none.
    """
    with contextlib.suppress(Exception):
        await redis.connection_pool.disconnect(inuse_connections=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
