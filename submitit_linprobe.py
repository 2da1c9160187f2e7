"""Linear probing as a submitit job: main_linprobe.py's flags plus the launcher's (see util/submit.py).

    python submitit_linprobe.py --nodes 2 --ngpus 8 --partition gpu --config configs/mae/linprobe_vit_base_in1k.yaml \
        --finetune runs/mae_b/checkpoint-last.pth --data_path /data/imagenet --output_dir runs/lin_b
"""
import main_linprobe
from engine_finetune import validate_common_args
from util.submit import launch

if __name__ == "__main__":
    launch(main_linprobe.get_args_parser, validate_common_args, main_linprobe.main, "mim_linprobe",
           dry_run=main_linprobe.dry_run)
