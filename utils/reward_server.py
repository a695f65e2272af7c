"""A reference reward server: any registered reward (or weighted sum) over HTTP, for the `http` reward's client.

    python -m utils.reward_server --port 8000 --reward brightness
    python -m utils.reward_server --port 8000 --reward pickscore --device cuda --reward_model_paths pickscore=/models/ps
    # then, in the training run:  --reward_model http --reward_model_paths http=http://127.0.0.1:8000/

Protocol (the client's side is documented in utils/rewards.py): POST to any path with the JSON body
{"prompts": [str, ...], "images": [base64 PNG, ...]}, one prompt per image; the answer is status 200 with
{"scores": [float, ...]}, one per image in the request's order (an empty request answers {"scores": []}). A request
that breaks the protocol answers 400, a reward that fails 500, each with {"error": "<one line>"}. GET answers
{"reward": SPEC} (a health check). Scores come from the reward's `score(pil_images, prompts)`, so a reward
without a gradient serves as well as a differentiable one, and PNG being lossless, the client gets what the reward
computes on the same images locally.

Each connection gets a thread, and the reward scores one request at a time (a lock: a model is not shared between
threads), so a health check or a new request is taken while a client that gave up waiting still has one in flight.
The server listens on 127.0.0.1 unless --host says otherwise. A server of your own (GenEval, OCR, a VLM judge) in its
own environment needs only the same JSON in and out; this file is a template for it.

The fault flags (--sleep, --drop_scores) make it a misbehaving server, to test a client's timeouts and checks.
"""
import argparse
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import UsageError
from .rewards import decode_png, list_rewards, load_reward

logger = logging.getLogger(__name__)
MAX_BODY = 1 << 30  # bytes: 1 GiB of base64 images is far beyond a sane batch; larger requests are refused


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--reward", required=True,
                        help=f"the reward to serve: a name ({', '.join(list_rewards())}) or a weighted sum such as "
                             f"'pickscore:1.0,aesthetic:0.05'")
    parser.add_argument("--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH",
                        help="local folder or file of a scoring model instead of its hub id")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface; the server has no authentication)")
    parser.add_argument("--device", default="cpu", help="torch device of the reward model, e.g. cuda")
    g = parser.add_argument_group("fault injection (to test clients)")
    g.add_argument("--sleep", type=float, default=0.0, help="seconds to wait before answering each scoring request")
    g.add_argument("--drop_scores", type=int, default=0,
                   help="answer this many fewer scores than images (a wrong-shape answer)")
    args = parser.parse_args(argv)
    args.paths = {}
    for item in args.reward_model_paths:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--reward_model_paths expects NAME=PATH, got {item!r}")
        args.paths[name] = path
    if args.sleep < 0 or args.drop_scores < 0:
        raise UsageError(f"--sleep and --drop_scores must be >= 0, got {args.sleep:g} and {args.drop_scores}")
    return args


class BadRequest(ValueError):
    """The request breaks the protocol (answered 400)."""


def read_request(body: bytes):
    """The request body -> (PIL images, prompts), or BadRequest saying what is wrong."""
    try:
        request = json.loads(body)
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("prompts"), list) \
            or not isinstance(request.get("images"), list):
        raise BadRequest('expected {"prompts": [str, ...], "images": [base64 PNG, ...]}')
    prompts, images = request["prompts"], request["images"]
    if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"expected one prompt (a string) per image, got {len(prompts)} prompts for {len(images)} images")
    try:
        pil_images = [decode_png(image) for image in images]
    except Exception as err:  # binascii, PIL and type errors alike mean "not a base64 image"
        raise BadRequest(f"an image is not a base64 PNG ({type(err).__name__}: {err})") from None
    return pil_images, prompts


def make_handler(scorer, spec: str, sleep: float = 0.0, drop_scores: int = 0):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer(200, {"reward": spec})

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length", "-1"))
                if not 0 <= length <= MAX_BODY:
                    raise BadRequest(f"a Content-Length in [0, {MAX_BODY}] is required")
                pil_images, prompts = read_request(self.rfile.read(length))
            except ValueError as err:  # BadRequest, or a Content-Length that is not a number
                self._answer(400, {"error": str(err)})
                return
            try:
                with lock:
                    scores = scorer.score(pil_images, prompts) if prompts else []
            except Exception as err:  # the reward failed on these inputs: say so, the server keeps serving
                logger.exception("scoring failed")
                self._answer(500, {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"})
                return
            if prompts and sleep:
                time.sleep(sleep)
            self._answer(200, {"scores": scores[: max(len(scores) - drop_scores, 0)] if prompts else scores})

        def _answer(self, status: int, payload: dict):
            body = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (its timeout): nothing to do
                self.close_connection = True

        def log_message(self, format, *args):
            logger.info("%s %s", self.address_string(), format % args)

    return Handler


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scorer = load_reward(args.reward, paths=args.paths, device=args.device)
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(scorer, args.reward, args.sleep, args.drop_scores))
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror or err}); "
                         f"choose a free port (0: any)") from None
    host, port = server.server_address[:2]
    # the line a caller waits for: the reward is loaded and the port is open
    print(f"serving {args.reward} on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
