"""Pre-training as a submitit job: main_pretrain.py's flags plus the launcher's (see util/submit.py).

    python submitit_pretrain.py --nodes 4 --ngpus 8 --partition gpu --config configs/mae/pretrain_vit_base_in1k.yaml \
        --data_path /data/imagenet --output_dir runs/mae_b
    python submitit_pretrain.py --executor local --ngpus 2 --device cpu --model mae_vit_tiny_patch4 --input_size 32 ...
"""
import main_pretrain
from util.submit import launch

if __name__ == "__main__":
    launch(main_pretrain.get_args_parser, main_pretrain.validate_args, main_pretrain.main, "mim_pretrain")
