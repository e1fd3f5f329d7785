"""Spending limits: where a day and a month begin, how many submits the budget lets start, and the
figures `status` shows.

Pure decisions over counts and wall-clock times: nothing here reads the journal or sleeps. The
ledger (daemon.journal, table `charges`) gives the counts; the scheduler acts on the answers. Days and
months are calendar ones in `budget.timezone`, or the system's local time when it is null.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from .config import BudgetConfig

MINOR_UNITS = {"BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
               "CLP": 0, "ISK": 0, "JPY": 0, "KRW": 0, "PYG": 0, "UGX": 0, "VND": 0, "XAF": 0, "XOF": 0}
"""Currencies whose smallest unit is not a hundredth (ISO 4217); every other one has cents."""

BUDGET_META = "budget"
"""Journal meta key: the budget section the running daemon applies (JSON), for the readers of the journal."""


def encode(budget: BudgetConfig) -> str:
    return json.dumps(dataclasses.asdict(budget), sort_keys=True)


def decode(text: str | None) -> BudgetConfig:
    """The recorded budget; the defaults (no limits) when none is (a daemon of an earlier version)."""
    if not text:
        return BudgetConfig()
    known = {f.name for f in dataclasses.fields(BudgetConfig)}
    return BudgetConfig(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass(frozen=True)
class Periods:
    """The day and the calendar month a moment falls in, as [start, end) wall times."""

    day_start: float
    day_end: float
    month_start: float
    month_end: float


@dataclass(frozen=True)
class Used:
    """Images the ledger counts as paid in the current day and month."""

    day: int
    month: int


@dataclass(frozen=True)
class Allowance:
    """What the budget says about starting submits now."""

    may_start: int | None
    """How many more submits may start; None: no limit is set."""
    reason: str | None = None
    """Set once the ledger alone has reached a limit: submits pause, "daily limit of 200 images reached"."""
    resume_at: float | None = None
    """While paused: the wall time the limit lifts (the next day's or month's start)."""


def _midnight(day: date, zone: ZoneInfo | None) -> float:
    # Without a zone the naive datetime is the system's local time (mktime), daylight saving included;
    # a midnight a DST change skips resolves to the first moment of that day.
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def periods(now: float, timezone: str | None) -> Periods:
    """Start of today, of tomorrow, of this month and of next month for wall time `now`."""
    zone = ZoneInfo(timezone) if timezone else None
    today = datetime.fromtimestamp(now, zone).date()
    first = today.replace(day=1)
    next_first = (first + timedelta(days=32)).replace(day=1)
    return Periods(_midnight(today, zone), _midnight(today + timedelta(days=1), zone),
                   _midnight(first, zone), _midnight(next_first, zone))


def limit_text(period: str, limit: int) -> str:
    return f"{period} limit of {limit} image{'' if limit == 1 else 's'} reached"


def allowance(budget: BudgetConfig, used: Used, launching: int, when: Periods) -> Allowance:
    """How many submits may start now, given what the ledger holds and what is being launched.

    Jobs being launched (publishing, submitting) will be charged if the provider accepts them, so
    they use up the allowance too; but only the ledger itself reaching a limit pauses submits (a
    launch that comes back unpaid must not announce a limit that was never reached). With both
    limits reached, the one that lifts later is the reason.
    """
    limits = [(limit, count, name, ends) for limit, count, name, ends in
              ((budget.daily_limit, used.day, "daily", when.day_end),
               (budget.monthly_limit, used.month, "monthly", when.month_end)) if limit is not None]
    if not limits:
        return Allowance(None)
    reached = [(ends, limit_text(name, limit)) for limit, count, name, ends in limits if count >= limit]
    if reached:
        resume_at, reason = max(reached)
        return Allowance(0, reason, resume_at)
    return Allowance(max(0, min(limit - count - launching for limit, count, _name, _ends in limits)))


def caps(budget: BudgetConfig, when: Periods) -> list[tuple[int, float, float]]:
    """Each limit set, as (images, since, until): paid and launching submits in [since, until) may not
    pass it. The journal checks them again in the transaction that claims jobs, so daemons of a fleet
    claiming at the same moment cannot together pass a limit."""
    return [(limit, start, end) for limit, start, end in
            ((budget.daily_limit, when.day_start, when.day_end),
             (budget.monthly_limit, when.month_start, when.month_end)) if limit is not None]


def money(images: int, price: float | None, currency: str) -> float | None:
    """What `images` accepted submits cost, rounded to the currency's smallest unit; None without a price."""
    if price is None:
        return None
    exact = Decimal(str(price)) * images
    return float(exact.quantize(Decimal(1).scaleb(-decimals(currency)), rounding=ROUND_HALF_UP))


def decimals(currency: str) -> int:
    """Digits after the point in an amount of `currency`: 2, or what ISO 4217 says for the few others."""
    return MINOR_UNITS.get(currency.upper(), 2)


def money_text(amount: float, currency: str) -> str:
    """"0.06 USD", "1.50 EUR", "300 JPY"."""
    return f"{amount:.{decimals(currency)}f} {currency.upper()}"


def moment_text(at: float | None, timezone: str | None) -> str | None:
    """`at` as an ISO time with its offset, in the zone days are counted in (for the log)."""
    if at is None:
        return None
    zone = ZoneInfo(timezone) if timezone else None
    return datetime.fromtimestamp(at, zone).astimezone(zone).isoformat(timespec="seconds")


def zone_name(timezone: str | None, now: float) -> str:
    """The zone days and months are counted in, for people: the configured name or the local one."""
    return timezone or f"local time, {datetime.fromtimestamp(now).astimezone().tzname()}"


def summary(budget: BudgetConfig, used: Used, queued: int, when: Periods, now: float) -> dict[str, Any]:
    """The budget block of `status`: used / limit / remaining per day and month, the money spent, and
    what the queued files will cost once submitted (limits and money None when not configured)."""
    currency = budget.currency.upper()

    def period(count: int, limit: int | None, resets_at: float) -> dict[str, Any]:
        return {"used": count, "limit": limit, "remaining": None if limit is None else max(0, limit - count),
                "spent": money(count, budget.price_per_image, currency), "resets_at": resets_at}

    return {
        "day": period(used.day, budget.daily_limit, when.day_end),
        "month": period(used.month, budget.monthly_limit, when.month_end),
        "queued": queued,
        "queued_cost": money(queued, budget.price_per_image, currency),
        "price_per_image": budget.price_per_image,
        "currency": currency,
        "currency_decimals": decimals(currency),
        "timezone": zone_name(budget.timezone, now),
    }
