# How the pages write dates in German (see ../en/formats.py): "30. Nov 2026, 14:05", "30. Nov".
DATETIME_FORMAT = "j. M Y, H:i"
MONTH_DAY_FORMAT = "j. M"
