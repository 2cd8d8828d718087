"""R1-style reasoning: checkable tasks, cold-start SFT, GRPO and evaluation over the shared training core and the engine.

`tasks/` generates problems whose answers can be checked exactly and scores completions of the
form `<think>reasoning</think>answer`; the drivers (SFT, GRPO, evaluation) train and measure a
model on them through the training core and the one inference engine. This package init imports
nothing, so that importing the tasks never pulls in the trainer or the model.
"""
