# How the pages write dates in English (FORMAT_MODULE_PATH; Django's own formats fill in the rest):
# DATETIME_FORMAT for a moment on its own ("30 Nov 2026, 14:05"), MONTH_DAY_FORMAT before a time
# within the year (timelines, the review queue: "30 Nov, 14:05:09").
DATETIME_FORMAT = "j M Y, H:i"
MONTH_DAY_FORMAT = "j M"
