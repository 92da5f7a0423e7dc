"""Sizes in words: the one way the portal writes a byte count for a person.

1024-based with the names people read on their disks (KB, MB, GB, TB: OpenStack's GB is a GiB, as
IMS counts them), one decimal below 10 and none from 10 on, like `ls -h`: "16 MB", "312 MB",
"1.0 GB", "128 GB". No Django import: uploads.ims uses it too. Pages write sizes in the person's
language ("1,5 GB" in German) through uploads.i18n.local_size, also behind the `human_size`
template filter (uploads/templatetags/uploads_extras.py).
"""

UNITS = ("KB", "MB", "GB", "TB", "PB")


def human_size(n: int | float | None, *, decimal_separator: str = ".") -> str:
    """`n` bytes in words (in English; uploads.i18n.local_size for the person's language)."""
    n = max(0, int(n or 0))
    if n < 1024:
        return f"{n} {'byte' if n == 1 else 'bytes'}"
    value, unit = n / 1024, 0
    while unit < len(UNITS) - 1 and _shown(value) >= 1024:
        value, unit = value / 1024, unit + 1
    number = f"{_shown(value):.{1 if _shown(value) < 10 else 0}f}".replace(".", decimal_separator)
    return f"{number} {UNITS[unit]}"


def _shown(value: float) -> float:
    """The number as it will be written: rounded to one decimal below 10, else to a whole."""
    one_decimal = round(value, 1)
    return one_decimal if one_decimal < 10 else float(round(value))
