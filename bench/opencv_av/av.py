"""The part of PyAV's API that utils/preencode.py reads videos with (`av.open(source)`, `container.decode(video=0)`,
`frame.to_ndarray(format="rgb24")`, `av.FFmpegError`), on OpenCV's video reader.

For bench/wan.py on a machine that has opencv-python-headless but not PyAV (the GPU machine: PyAV's 37 MB wheel does
not fit the device tool's 64 MiB working tree beside the other wheels and the checkout). bench/wan.py puts this
folder on its subprocesses' PYTHONPATH only where `import av` fails. Only the set-up reads videos (the pre-encoding of
the benchmark's clips); no timed step does. Paths only: utils/preencode.py hands PyAV bytes as a stream, which
OpenCV cannot open.
"""
import cv2


class FFmpegError(Exception):
    """Raised where PyAV would raise its FFmpegError: a file OpenCV cannot open."""


class _Frame:
    def __init__(self, rgb):
        self._rgb = rgb

    def to_ndarray(self, format="rgb24"):
        if format != "rgb24":
            raise ValueError(f"only rgb24 frames, not {format}")
        return self._rgb


class _Container:
    def __init__(self, source):
        if not isinstance(source, str):
            raise FFmpegError("OpenCV opens video files by path only")
        self._capture = cv2.VideoCapture(source)
        if not self._capture.isOpened():
            raise FFmpegError(f"OpenCV cannot open {source}")

    def decode(self, video=0):
        """The frames of the first video stream, in order, as RGB."""
        while True:
            ok, bgr = self._capture.read()
            if not ok:
                return
            yield _Frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def close(self):
        self._capture.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(source, mode="r"):  # noqa: A001 (PyAV's name)
    if mode != "r":
        raise ValueError("this stand-in only reads; bench/wan.py writes with cv2.VideoWriter where PyAV is missing")
    return _Container(source)
