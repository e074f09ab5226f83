"""thinktree.trainer — orchestration: config, models, tree → signal compilers, training, rounds, eval, CLI.

Only this package imports trl, accelerate, deepspeed and peft.
"""
