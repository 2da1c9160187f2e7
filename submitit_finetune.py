"""Fine-tuning as a submitit job: main_finetune.py's flags plus the launcher's (see util/submit.py).

    python submitit_finetune.py --nodes 4 --ngpus 8 --partition gpu --config configs/mae/finetune_vit_base_in1k.yaml \
        --finetune runs/mae_b/checkpoint-last.pth --data_path /data/imagenet --output_dir runs/ft_b
"""
import main_finetune
from util.submit import launch

if __name__ == "__main__":
    launch(main_finetune.get_args_parser, main_finetune.validate_args, main_finetune.main, "mim_finetune",
           dry_run=main_finetune.dry_run)
