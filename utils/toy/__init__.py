"""The toy world and the tiny models: test and demo infrastructure, kept apart from the product in utils/.

- tiny.py          tiny random SD1.5 / SDXL / SD3 / FLUX / SD 2.x (v-prediction) / Wan 2.1 (video) pipelines built in
                   code (`tiny-sd`, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`, `tiny-sd2`, `tiny-wan`), for the tests
- tiny_rewards.py  tiny scoring-model checkpoints in the real file formats, for the loaders' tests
- world.py         the procedural captioned toy world and its pixel judge
- video_world.py   the toy video world (the same shapes moving left, right, up, down or standing still) and its judge
- models.py        the toy world's own models (`toy-sd`, `toy-sd3`, `toyclip`, committed in assets/) and their
                   trainers
- synthetic.py     synthetic preference sets

The package is a plugin (utils/plugins.py), loaded by default: importing it registers its pipelines (`tiny-*`, built
on first use; `toy-sd`, `toy-sd3`), its scorers (`toyclip`; `toyworld_judge`, the pixel judge as a reward without a
gradient), its judge for evaluate.py's --judges (`toyworld_acc`) and its prompt set (`toyworld`) with the product's
registries, as a user's own plugin would; the video world likewise registers `toyvideo_judge`, `toyvideo_acc` and
`toyvideo`. The product code imports nothing from here.
"""
from ..data import register_prompt_set
from ..models import register_pipeline
from .. import UsageError
from ..rewards import Judge, JudgeReward, PickScore, load_clip, register_judge, register_reward
from .names import ASSETS, TINY_NAMES, TOY_NAMES, TOY_SD3_PATH, TOY_SD_PATH, TOYCLIP_PATH  # noqa: F401 (its names)


def _tiny_builder(name):
    def build() -> str:
        from .tiny import tiny_pipeline_path  # builds and saves the pipeline the first time

        return tiny_pipeline_path(name)

    return build


for _name, _folder in TOY_NAMES.items():
    register_pipeline(_name, _folder)
for _name in TINY_NAMES:
    register_pipeline(_name, _tiny_builder(_name))


def _video_prompt_set():
    from .video_world import video_prompt_set  # on first use: `python -m utils.toy.video_world` runs it as a script

    return video_prompt_set()


def _register_prompt_set():
    from .world import prompt_set

    register_prompt_set("toyworld", prompt_set())  # the toy world's 54 count x colour x shape prompts
    register_prompt_set("toyvideo", _video_prompt_set)  # 270: count x colour x shape x direction


_register_prompt_set()


def _build_toyclip(name, path):
    """toyclip: the committed toy CLIP (or a local copy at `path`), scored as PickScore."""
    path = path or str(TOYCLIP_PATH)
    return PickScore(name, *load_clip(name, path, path))


register_reward("toyclip", _build_toyclip)


def _judge_scene(image, prompt: str) -> float:
    from .world import prompt_accuracy

    return prompt_accuracy(image, prompt)["all"]


# what each world's prompts must name, and an example for the error
_TOY_PROMPTS = {False: ("toy-world", ("shape",), "'two red circles'"),
                True: ("toy-video", ("shape", "direction"), "'two red circles moving left'")}


def _toy_prompt_check(what: str, video: bool = False):
    """check_prompts of the judge: every prompt names a shape, a video prompt a direction too (`what` names the judge
    or reward in the error)."""

    def check(prompts):
        from .video_world import parse_video_prompt
        from .world import parse_prompt

        parse = parse_video_prompt if video else parse_prompt
        world, needs, example = _TOY_PROMPTS[video]
        not_toy = [p for p in prompts if any(parse(p)[k] is None for k in needs)]
        if not_toy:
            raise UsageError(f"the {what} reads {world} prompts (a count, colour and {' and '.join(needs)}, e.g. "
                             f"{example}); {len(not_toy)} of the prompts name no {' or no '.join(needs)}, e.g. "
                             f"{not_toy[0]!r}")

    return check


# One judge, two faces: a column of evaluate.py (--judges toyworld_acc) and a reward without a gradient for online RL
# (--reward_model toyworld_judge): 1.0 when count, colour and shape are all right (an offline GenEval), else 0.0.
register_judge("toyworld_acc", _judge_scene, _toy_prompt_check("toyworld_acc judge"))
register_reward("toyworld_judge",
                lambda name, path: JudgeReward(name, Judge(_judge_scene, _toy_prompt_check(f"{name} reward"))),
                learned=False, differentiable=False)


def _judge_clip(video, prompt: str) -> float:
    from .video_world import clip_accuracy

    return clip_accuracy(video, prompt)["all"]


class _VideoJudgeReward(JudgeReward):
    """score(videos, prompts): one video per prompt in any of the video judge's formats (utils/toy/video_world.py),
    not a PIL image, so the judge takes it as it is."""

    takes_videos = True

    def _score_pil(self, videos, prompts):
        self.judge.check_prompts(prompts)
        return [self.judge.judge(video, prompt) for video, prompt in zip(videos, prompts)]


# The video world's judge, the same two faces: 1.0 when count, colour, shape and the direction of motion are all right
register_judge("toyvideo_acc", _judge_clip, _toy_prompt_check("toyvideo_acc judge", video=True))
register_reward("toyvideo_judge",
                lambda name, path: _VideoJudgeReward(name, Judge(_judge_clip,
                                                                 _toy_prompt_check(f"{name} reward", video=True))),
                learned=False, differentiable=False)
