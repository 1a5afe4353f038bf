"""ResNet-101 quantization-aware training (QAT) with openamct: AMCT's resnet-101 retrain sample, ported.

Run from the sample root (samples/resnet101), as with AMCT:

    CUDA_VISIBLE_DEVICES=0 python ./src/resnet-101_retrain.py --train_set TRAIN_SET --eval_set EVAL_SET \\
        --config_defination ./src/retrain_conf/retrain.cfg                  # one GPU (or the CPU without one)
    CUDA_VISIBLE_DEVICES=0,1 python ./src/resnet-101_retrain.py ... --distributed   # one process per GPU (DDP)
    torchrun --nproc_per_node=2 ./src/resnet-101_retrain.py ...                      # DDP, launched by torchrun

Steps (AMCT's): FP32 accuracy on the eval set -> create_quant_retrain_config -> create_quant_retrain_model ->
train_iter SGD steps -> batch_num eval batches (they write the record file) -> save_quant_retrain_model (deploy
and fake-quant ONNX models) -> accuracy of the fake-quant model in ONNX Runtime.
Outputs go to ./outputs/retrain; the log to ./amct_log/amct_pytorch.log.
"""
import argparse
import os
import sys

import onnxruntime as ort
import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
import torch.multiprocessing as mp
from resnet import MODEL_FILE, WEIGHTS_URL, resnet101
from torch import nn

import openamct as amct
from openamct.app import training
from openamct.app.data import ImageLoader, LabelledImages, Preprocess, topk_hits
from openamct.core import qat
from openamct.core.fileio import is_main_process

PATH = os.path.realpath('./')
OUTPUTS = os.path.join(PATH, 'outputs/retrain')
TMP = os.path.join(OUTPUTS, 'tmp')
SIZE = 224
CPU_PROCESSES = 2  # --distributed without a GPU: this many CPU processes (gloo)
# eval: Resize(256), CenterCrop(224), ToTensor(), Normalize(ImageNet mean, std); train: PREPROCESS.augment()
# (RandomResizedCrop(224), RandomHorizontalFlip(), ToTensor(), the same Normalize), on PIL only
PREPROCESS = Preprocess(resize=256, crop=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

PARSER = argparse.ArgumentParser(
    description='ResNet-101 quantization-aware training with openamct (AMCT sample). Run from the sample root.')
PARSER.add_argument('--config_defination', dest='config_defination', default=None, type=str,
                    help='The simple configure define file (e.g. ./src/retrain_conf/retrain.cfg).')
PARSER.add_argument('--batch_num', dest='batch_num', default=2, type=int,
                    help='number of eval batches run after training to write the quantization factors (default: 2)')
PARSER.add_argument('--train_set', dest='train_set', default=None, type=str,
                    help='The path of ILSVRC-2012-CLS image classification dataset for training '
                         '(class sub-folders, as torchvision ImageFolder).')
PARSER.add_argument('--eval_set', dest='eval_set', default=None, type=str,
                    help='The path of ILSVRC-2012-CLS image classification dataset for evaluation '
                         '(class sub-folders, as torchvision ImageFolder).')
PARSER.add_argument('--num_parallel_reads', dest='num_parallel_reads', default=4, type=int,
                    help='The number of DataLoader worker processes (default: 4).')
PARSER.add_argument('--batch_size', dest='batch_size', default=25, type=int,
                    help='batch size of each process (default: 25)')
PARSER.add_argument('--learning_rate', dest='learning_rate', default=1e-5, type=float,
                    help='initial learning rate (default: 1e-5)')
PARSER.add_argument('--train_iter', dest='train_iter', default=2000, type=int,
                    help='number of total iterations to run (default: 2000)')
PARSER.add_argument('--print_freq', dest='print_freq', default=10, type=int, help='print frequency (default: 10)')
PARSER.add_argument('--dist_url', dest='dist_url', default='tcp://127.0.0.1:50011', type=str,
                    help='url used to set up distributed training (default: tcp://127.0.0.1:50011)')
PARSER.add_argument('--distributed', dest='distributed', action='store_true',
                    help='Use multi-processing distributed training: one process per visible GPU (nccl), or '
                         f'{CPU_PROCESSES} CPU processes (gloo) when no GPU is visible. Not needed under torchrun.'
                    )


class InputError(Exception):
    """A missing or malformed input: reported as one '[ERROR]' line, exit code 2."""


def args_check(args):
    """Verify the validity of input parameters."""
    for name, path, what in (('--train_set', args.train_set, 'training'), ('--eval_set', args.eval_set, 'evaluation')):
        if path is None:
            raise InputError(f'Must specify a {what} dataset path: {name} PATH (a folder of class sub-folders)')
        if not os.path.isdir(path):
            raise InputError(f'Must specify a valid {what} dataset path: {name} {os.path.realpath(path)} is not a '
                             'folder')
    args.train_set = os.path.realpath(args.train_set)
    args.eval_set = os.path.realpath(args.eval_set)
    if args.config_defination is not None:
        if not os.path.isfile(args.config_defination):
            raise InputError(f'--config_defination {os.path.realpath(args.config_defination)} not found')
        args.config_defination = os.path.realpath(args.config_defination)
    for name in ('batch_num', 'batch_size', 'train_iter'):
        if getattr(args, name) < 1:
            raise InputError(f'--{name} must be a positive integer, got {getattr(args, name)}')
    if args.num_parallel_reads < 0 or args.print_freq < 0:
        raise InputError('--num_parallel_reads and --print_freq must not be negative')
    if not os.path.isfile(MODEL_FILE):
        raise InputError(f'model file {os.path.realpath(MODEL_FILE)} not found: download {WEIGHTS_URL} into '
                         f'{os.path.realpath(os.path.dirname(MODEL_FILE))}/')


def log(message):
    """Print on rank 0 only (every process runs the same steps)."""
    if is_main_process():
        print(message, flush=True)


def get_input_data(shape_list, model):
    """Get input data to trace the model for openamct (random data will do), on the model's device."""
    device = next(model.parameters()).device
    return tuple([torch.randn(shape).to(device) for shape in shape_list])


def create_datasets(args):
    """The training and evaluation image sets (any layout LabelledImages reads; ImageFolder's class folders)."""
    try:
        train_set = LabelledImages(args.train_set, PREPROCESS.augment())
        eval_set = LabelledImages(args.eval_set, PREPROCESS)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    return train_set, eval_set


def create_data_loader(args, distributed):
    """Generate the dataset loaders: the training one shuffled (DistributedSampler under DDP), the eval one in order."""
    train_set, eval_set = create_datasets(args)
    train_sampler = torch.utils.data.distributed.DistributedSampler(train_set) if distributed else None
    train_loader = ImageLoader(train_set, args.batch_size, workers=args.num_parallel_reads, shuffle=True,
                               sampler=train_sampler)
    val_loader = ImageLoader(eval_set, args.batch_size, workers=args.num_parallel_reads)
    return train_loader, val_loader


def validate(val_loader, model, device, print_freq, iterations=None):
    """Validate the model (eval mode, `iterations` batches or all); returns top-1 and top-5 accuracy in percent."""
    model.eval()
    total = hits1 = hits5 = 0
    with torch.no_grad():
        for i, (images, target) in enumerate(val_loader):
            output = model(images.to(device, non_blocking=True))
            top1, top5 = topk_hits(output.float(), target)
            total, hits1, hits5 = total + len(target), hits1 + top1, hits5 + top5
            if print_freq and (i + 1) % print_freq == 0 and iterations is None:
                log(f'Test: [{i + 1}/{len(val_loader)}]\tAcc@1 {100 * hits1 / total:6.2f}\t'
                    f'Acc@5 {100 * hits5 / total:6.2f}')
            if iterations is not None and i + 1 >= iterations:
                break
    return 100 * hits1 / max(total, 1), 100 * hits5 / max(total, 1)


def validate_onnx(val_loader, onnx_model, print_freq):
    """Validate the onnx model in ONNX Runtime (CPU); returns top-1 and top-5 accuracy in percent."""
    ort_session = ort.InferenceSession(onnx_model, providers=['CPUExecutionProvider'])
    total = hits1 = hits5 = 0
    for i, (images, target) in enumerate(val_loader):
        output = ort_session.run(None, {'input': images.numpy()})
        top1, top5 = topk_hits(output[0], target)
        total, hits1, hits5 = total + len(target), hits1 + top1, hits5 + top5
        if print_freq and (i + 1) % print_freq == 0:
            print(f'Test: [{i + 1}/{len(val_loader)}]\tAcc@1 {100 * hits1 / total:6.2f}\t'
                  f'Acc@5 {100 * hits5 / total:6.2f}')
    return 100 * hits1 / max(total, 1), 100 * hits5 / max(total, 1)


def setup_device(index, nprocs, args):
    """Join the process group when distributed; returns (device, distributed, gpu index or None)."""
    cuda = torch.cuda.is_available()
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:  # launched by torchrun
        gpu = int(os.environ.get('LOCAL_RANK', 0)) if cuda else None
        if cuda:
            torch.cuda.set_device(gpu)
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
        return torch.device('cuda', gpu) if cuda else torch.device('cpu'), True, gpu
    if args.distributed:  # started by mp.spawn: rank = GPU index (or CPU process index)
        gpu = index if cuda else None
        if cuda:
            torch.cuda.set_device(gpu)
        else:  # the CPU processes share the cores
            torch.set_num_threads(max(1, torch.get_num_threads() // nprocs))
        dist.init_process_group(backend='nccl' if cuda else 'gloo', init_method=args.dist_url,
                                world_size=nprocs, rank=index)
        return torch.device('cuda', gpu) if cuda else torch.device('cpu'), True, gpu
    return (torch.device('cuda', 0), False, 0) if cuda else (torch.device('cpu'), False, None)


def main_worker(index, nprocs, args):
    """One training process (the only one without --distributed); returns the exit code."""
    device, distributed, gpu = setup_device(index, nprocs, args)
    try:
        return retrain_worker(device, distributed, gpu, args)
    finally:
        if distributed:
            dist.destroy_process_group()


def retrain_worker(device, distributed, gpu, args):
    """The QAT flow of one process; rank 0 writes the files and prints the results."""
    try:
        train_loader, val_loader = create_data_loader(args, distributed)
    except InputError as err:
        print(f'[ERROR] {err}', file=sys.stderr)
        return 2

    # Phase origin model accuracy.
    # Step 1: create the model (ImageNet weights from ./model).
    log("=> Create pre-trained model 'resnet101'")
    model = resnet101(pretrained=True).to(device)

    # Step 2: accuracy of the FP32 model on the eval set.
    log("=> Validate pre-trained model 'resnet101'")
    ori_top1, ori_top5 = validate(val_loader, model, device, args.print_freq)
    log(f'The origin model top 1 accuracy = {ori_top1:.2f}%.')
    log(f'The origin model top 5 accuracy = {ori_top5:.2f}%.')

    # Phase retrain the model.
    # Step 1: the QAT config (rank 0 writes it, the others wait and read it).
    config_file = os.path.join(TMP, 'config.json')
    record_file = os.path.join(TMP, 'record.txt')
    log('==> AMCT step1: create_quant_retrain_config..')
    try:
        amct.create_quant_retrain_config(config_file, model, get_input_data([(1, 3, SIZE, SIZE)], model),
                                         args.config_defination)
    except amct.ConfigError as err:
        print(f'[ERROR] {err}', file=sys.stderr)
        return 2
    if distributed:
        dist.barrier()

    # Step 2: the QAT model (a copy with BN folded; its first batch_num training batches initialise the ranges).
    log('==> AMCT step2: create_quant_retrain_model..')
    model = amct.create_quant_retrain_model(config_file, model, record_file,
                                            get_input_data([(1, 3, SIZE, SIZE)], model))
    qat_model = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=None if gpu is None else [gpu],
                                                    find_unused_parameters=True)

    # Step 3: train for train_iter steps: SGD with momentum, cross-entropy loss; the quantizer ranges get no decay.
    optimizer = torch.optim.SGD(qat.parameter_groups(qat_model, weight_decay=1e-4), args.learning_rate,
                                momentum=0.9)
    log('=> training quantized model')
    training.train(model, train_loader, args.train_iter, optimizer, device=device, print_freq=args.print_freq)

    # Step 4: eval mode over batch_num eval batches: this writes the quantization factors to the record file.
    validate(val_loader, model, device, args.print_freq, iterations=args.batch_num)
    if not qat.initialised(qat_model):
        print('[ERROR] the activation ranges are not initialised: the first batch_num batches of the config '
              'initialise them; raise --train_iter', file=sys.stderr)
        return 2
    if distributed:
        dist.barrier()
    if not is_main_process():
        return 0

    # Phase save the model and test the fake-quant model (rank 0).
    torch.save({'state_dict': model.state_dict()}, os.path.join(TMP, 'model_best.pth.tar'))
    print('==> AMCT step3: save_quant_retrain_model..')
    quantized_path = os.path.join(OUTPUTS, 'ResNet101')
    amct.save_quant_retrain_model(config_file, model, record_file, quantized_path,
                                  get_input_data([(1, 3, SIZE, SIZE)], qat_model),
                                  input_names=['input'], output_names=['output'],
                                  dynamic_axes={'input': {0: 'batch_size'}, 'output': {0: 'batch_size'}})
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    print('=> validating fake quant model')
    quant_top1, quant_top5 = validate_onnx(val_loader, quantized_path + '_fake_quant_model.onnx', args.print_freq)

    print(f'[INFO] ResNet101 before retrain top1:{ori_top1:.2f}% top5:{ori_top5:.2f}%')
    print(f'[INFO] ResNet101 after retrain top1:{quant_top1:.2f}% top5:{quant_top5:.2f}%')
    return 0


def spawned_worker(index, nprocs, args):
    """mp.spawn entry: a non-zero exit code ends the process with it."""
    code = main_worker(index, nprocs, args)
    if code:
        sys.exit(code)


def main(args):
    """Sample main function; returns the exit code."""
    try:
        args_check(args)
        create_datasets(args)  # fail early, before any process is started
    except InputError as err:
        print(f'[ERROR] {err}', file=sys.stderr)
        return 2
    cudnn.benchmark = True

    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        log('Launched by torchrun: DistributedDataParallel mode, {} processes.'.format(os.environ['WORLD_SIZE']))
        return main_worker(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), args)
    gpu_num = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.distributed:
        # Use torch.multiprocessing.spawn to launch one process per GPU (or CPU_PROCESSES on the CPU).
        if gpu_num > 0:
            nprocs = gpu_num
            print('Using multi GPUs: DistributedDataParallel mode.')
        else:
            nprocs = CPU_PROCESSES
            print(f'No GPU: DistributedDataParallel mode over {nprocs} CPU processes (gloo), this will be slow.')
        try:
            mp.spawn(spawned_worker, nprocs=nprocs, args=(nprocs, args))
        except mp.ProcessExitedException as err:
            return err.exit_code if err.exit_code and err.exit_code > 0 else 1
        return 0
    if gpu_num > 0:
        print('Using single GPU.')
    else:
        print('Using CPU, this will be slow')
    return main_worker(0, 1, args)


if __name__ == '__main__':
    sys.exit(main(PARSER.parse_args()))
