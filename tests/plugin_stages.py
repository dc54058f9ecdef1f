"""Tiny stages for engine tests: they chain text files, and can pause mid-write to be killed."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from deploykit.artifacts import StageResult
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register


class AppendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field("x", description="Text appended to the upstream text.")


@register("append")
class AppendStage(Stage):
    """Writes upstream text + its own text; counts its runs in $DEPLOYKIT_TEST_COUNTER."""

    Config = AppendConfig

    def run(self, ctx: StageContext) -> StageResult:
        before = ""
        if any(r.artifact("text") for r in ctx.upstream):
            before = ctx.find("text").path.read_text()
        out = ctx.out_dir / "out.txt"
        with open(out, "w") as f:
            f.write(before)
            f.flush()
            if os.environ.get("DEPLOYKIT_TEST_PAUSE_STAGE") == ctx.name:  # hold here, half written, to be killed
                time.sleep(float(os.environ.get("DEPLOYKIT_TEST_PAUSE", "60")))
            if self.config.text == "FAIL":
                raise RuntimeError("stage failed on purpose")
            f.write(self.config.text)
        counter = os.environ.get("DEPLOYKIT_TEST_COUNTER")
        if counter:
            with open(counter, "a") as f:
                f.write(ctx.name + "\n")
        return StageResult(artifacts={"text": "out.txt"}, metrics={"length": len(before) + len(self.config.text)})
