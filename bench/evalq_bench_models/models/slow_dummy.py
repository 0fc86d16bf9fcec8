"""The dummy model with a cost per request: it sleeps `seconds_per_request` for each request
(no CPU), as a model served elsewhere does, so what a cache or a resume saves shows as time.

    python -m lmms_eval --model slow_dummy --model_args seconds_per_request=0.05 ...
"""

from __future__ import annotations

import time
from typing import Any

from lmms_eval.models.simple.dummy import Dummy
from tqdm import tqdm


class SlowDummy(Dummy):
    def __init__(self, seconds_per_request: float | str = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds_per_request = float(seconds_per_request)
        if self.seconds_per_request < 0:
            raise ValueError("seconds_per_request must not be negative")

    def _answer(self, requests: list[Any], answer: Any) -> list[Any]:
        out = []
        for _ in tqdm(requests, disable=(self.rank != 0), desc="Model Responding"):
            time.sleep(self.seconds_per_request)
            out.append(answer)
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        return self._answer(requests, self._response)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        return self._answer(requests, (0.0, False))

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        return self.generate_until(requests)
