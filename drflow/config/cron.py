"""Cron expressions of drill schedules: validation and matching, in the standard 5-field form."""

from __future__ import annotations

from datetime import datetime

_CRON_FIELDS: list[tuple[str, int, int, list[str]]] = [
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, ["jan", "feb", "mar", "apr", "may", "jun",
                      "jul", "aug", "sep", "oct", "nov", "dec"]),
    ("day of week", 0, 7, ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]),
]


def cron_problem(expr: str) -> str | None:
    """Why `expr` is not a valid 5-field cron expression, or None if it is."""
    parts = expr.split()
    if len(parts) != 5:
        return (f"must be a 5-field cron expression 'minute hour day-of-month month day-of-week', "
                f"e.g. '0 3 * * 0' (got {len(parts)} fields)")
    for part, (name, lo, hi, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            rng, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                return f"cron {name} field {part!r}: step must be a positive number"
            if rng == "*":
                continue
            bounds = rng.split("-")
            if len(bounds) > 2:
                return f"cron {name} field {part!r}: bad range {rng!r}"
            values: list[int] = []
            for b in bounds:
                if b.isdigit():
                    values.append(int(b))
                elif b.lower() in names:
                    # Month names count from 1, weekday names from 0 (sun).
                    values.append(names.index(b.lower()) + (1 if lo == 1 else 0))
                else:
                    return f"cron {name} field {part!r}: {b!r} is not a number"
            if any(not lo <= v <= hi for v in values):
                return f"cron {name} field {part!r}: values must be within {lo}-{hi}"
            if len(values) == 2 and values[0] > values[1]:
                return f"cron {name} field {part!r}: range {rng!r} runs backwards"
    return None


def _cron_values(part: str, lo: int, hi: int, names: list[str]) -> set[int]:
    out: set[int] = set()
    for item in part.split(","):
        rng, _, step = item.partition("/")
        if rng == "*":
            a, b = lo, hi
        else:
            bounds = [int(x) if x.isdigit() else names.index(x.lower()) + (1 if lo == 1 else 0)
                      for x in rng.split("-")]
            a, b = bounds[0], bounds[-1] if len(bounds) == 2 or not step else hi
        out.update(range(a, b + 1, int(step) if step else 1))
    return out


def cron_matches(expr: str, at: datetime) -> bool:
    """Whether the valid 5-field cron `expr` fires in the minute of `at` (cron's rules: when
    both day of month and day of week are restricted, either one matching is enough)."""
    sets = [_cron_values(p, lo, hi, names)
            for p, (_, lo, hi, names) in zip(expr.split(), _CRON_FIELDS, strict=True)]
    minute, hour, mday, month, wday = sets
    if 7 in wday:
        wday.add(0)  # 0 and 7 are both Sunday
    day_ok = at.day in mday, at.isoweekday() % 7 in wday
    dom_any, dow_any = expr.split()[2] == "*", expr.split()[4] == "*"
    day = (day_ok[0] and day_ok[1]) if dom_any or dow_any else (day_ok[0] or day_ok[1])
    return at.minute in minute and at.hour in hour and at.month in month and day
