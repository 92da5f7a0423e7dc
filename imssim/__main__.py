"""python -m imssim: run the IMS + IAM simulator until SIGINT or SIGTERM."""
import argparse
import signal
import sys
import threading

from imssim.server import DEFAULT_DISK_FORMATS, Simulator


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m imssim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8990, help="0 picks a free port")
    parser.add_argument("--data-dir", required=True, help="where uploaded image bytes are stored")
    parser.add_argument("--token-ttl", type=float, default=86400, help="token lifetime in seconds")
    parser.add_argument("--processing-seconds", type=float, default=2.0,
                        help="how long an uploaded image stays 'saving' before 'active'")
    parser.add_argument("--disk-formats", default=",".join(DEFAULT_DISK_FORMATS),
                        help="comma-separated disk_format values that POST /v2/images accepts")
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    formats = tuple(f.strip() for f in args.disk_formats.split(",") if f.strip())
    sim = Simulator(args.data_dir, host=args.host, port=args.port, token_ttl=args.token_ttl,
                    processing_seconds=args.processing_seconds, disk_formats=formats,
                    quiet=args.quiet)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    sim.start()
    print(f"IMS simulator listening on {sim.url}", flush=True)
    try:
        while not stopping.wait(0.2):    # a timed wait lets the signal handler run promptly
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
