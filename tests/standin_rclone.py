"""A stand-in for rclone in the command adapter's tests: copies into and deletes from a local folder.

    standin_rclone.py publish <file> <folder> <key> [<url-base>]   copy; print <url-base>/<key> if given
    standin_rclone.py unpublish <folder> <key>                      delete; a missing file is fine

Failure modes, chosen by the uploaded file's name so that one daemon can meet all of them at once:
a name containing "exit1" fails with status 1, "hang" sleeps past any timeout, "slow" takes
$STANDIN_SLOW_SECONDS (default 1) before it uploads, "silent" uploads but prints no URL.
"""

from __future__ import annotations

import os
import shutil
import sys
import time


def main(argv: list[str]) -> int:
    action, *args = argv
    if action == "publish":
        source, folder, key, *base = args
        name = os.path.basename(source)
        if "exit1" in name:
            print("standin: uploading ...", file=sys.stderr)
            print("standin: remote refused the upload: quota exceeded", file=sys.stderr)
            return 1
        if "hang" in name:
            time.sleep(60)
        if "slow" in name:
            time.sleep(float(os.environ.get("STANDIN_SLOW_SECONDS", "1")))
        temp = os.path.join(folder, f".{key}.partial")
        shutil.copyfile(source, temp)
        os.replace(temp, os.path.join(folder, key))
        if base and "silent" not in name:
            print("standin: 1 file transferred")
            print(f"{base[0].rstrip('/')}/{key}")
        return 0
    if action == "unpublish":
        folder, key = args
        try:
            os.unlink(os.path.join(folder, key))
        except FileNotFoundError:
            pass
        return 0
    print(f"standin: unknown action {action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
