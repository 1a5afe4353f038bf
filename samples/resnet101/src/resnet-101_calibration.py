"""ResNet-101 post-training quantization (PTQ) with openamct: AMCT's resnet-101 calibration sample, ported.

Run from the sample root (samples/resnet101), as with AMCT:

    CUDA_VISIBLE_DEVICES=0 python ./src/resnet-101_calibration.py     # GPU 0
    CUDA_VISIBLE_DEVICES=-1 python ./src/resnet-101_calibration.py    # CPU (also used when no GPU is visible)

Steps (AMCT's): FP32 baseline on the test images -> create_quant_config -> quantize_model -> 2 calibration batches
-> save_model (deploy and fake-quant ONNX models) -> accuracy of the fake-quant model in ONNX Runtime.
Outputs go to ./outputs/calibration (./outputs/nuq with --nuq); the log to ./amct_log/amct_pytorch.log.
"""
import argparse
import os
import sys

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from resnet import resnet101

import openamct as amct
from openamct.app.data import Preprocess

PATH = os.path.realpath('./')
IMG_DIR = os.path.join(PATH, 'data/images')
LABEL_FILE = os.path.join(IMG_DIR, 'image_label.txt')
BATCH_SIZE = 32
ITERATIONS = 5  # 5 batches x 32 images: the 160 test images
# torchvision's Resize(256), CenterCrop(224), ToTensor(), Normalize(ImageNet mean, std), on PIL only
PREPROCESS = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

PARSER = argparse.ArgumentParser(description='ResNet-101 post-training quantization with openamct (AMCT sample). '
                                             'Run from the sample root; CUDA_VISIBLE_DEVICES=-1 runs on the CPU.')
PARSER.add_argument('--nuq', dest='nuq', action='store_true',
                    help='non-uniform weight quantization with ./src/nuq_conf/nuq_quant.cfg '
                         '(outputs under ./outputs/nuq)')


class InputError(Exception):
    """A missing or malformed input file: reported as one '[ERROR]' line, exit code 2."""


def get_labels_from_txt(label_file):
    """Read all images' name and label from label_file ('<file name> <class id>' per line, in evaluation order)."""
    if not os.path.isfile(label_file):
        raise InputError(
            f'{label_file} not found: put the sample\'s 160 test images (images.zip) and their image_label.txt '
            f'("<file name> <class id>" per line) in {IMG_DIR}/ (see README.md)')
    images, labels = [], []
    with open(label_file, 'r') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise InputError(f'{label_file}:{number}: expected "<file name> <class id>", got {line.strip()!r}')
            path = os.path.join(IMG_DIR, parts[0].strip())
            if not os.path.isfile(path):
                raise InputError(f'{label_file}:{number}: image {path} not found')
            images.append(path)
            labels.append(int(parts[1]))
    if not images:
        raise InputError(f'{label_file} lists no images')
    return images, labels


def prepare_image_input(images):
    """Read and preprocess images into one float32 NCHW batch."""
    batch = np.zeros((len(images), 3, 224, 224), dtype=np.float32)
    for index, image in enumerate(images):
        with Image.open(image) as input_image:
            batch[index] = PREPROCESS(input_image.convert('RGB'))
    return torch.from_numpy(batch)


def img_postprocess(probs, labels):
    """Top-1 and top-5 hits of a batch: the label is the largest logit / among the five largest."""
    top1_get = 0
    top5_get = 0
    probs = np.asarray(probs)
    prob_size = probs.shape[1]
    for index, label in enumerate(labels):
        top5_record = (probs[index, :].argsort(kind='stable'))[prob_size - 5: prob_size]
        if label == top5_record[-1]:
            top1_get += 1
            top5_get += 1
        elif label in top5_record:
            top5_get += 1
    return top1_get, top5_get


def batches(images, labels, batch_size, iterations):
    """`iterations` batches of `batch_size` images in label-file order (the last may be partial or missing)."""
    for i in range(iterations):
        chunk = slice(i * batch_size, (i + 1) * batch_size)
        if images[chunk]:
            yield i, images[chunk], labels[chunk]


def report(total, hits1, hits5, iteration=None):
    """Print one batch's (or the final) accuracy as AMCT's sample does."""
    if iteration is not None:
        print(f'****************iteration:{iteration}*****************')
        print(f'top1_acc:{hits1 / total}')
        print(f'top5_acc:{hits5 / total}')
    else:
        print(f'******final top1:{hits1 / total}')
        print(f'******final top5:{hits5 / total}')


def model_forward(model, images, labels, batch_size, iterations):
    """Do pytorch model forward; returns top-1 and top-5 accuracy over the images seen."""
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model.to(device)
    total = hits1 = hits5 = 0
    for i, batch_images, batch_labels in batches(images, labels, batch_size, iterations):
        input_batch = prepare_image_input(batch_images).to(device)
        with torch.no_grad():
            output = model(input_batch)
        top1, top5 = img_postprocess(output.float().cpu().numpy(), batch_labels)
        report(len(batch_labels), top1, top5, iteration=i)
        total, hits1, hits5 = total + len(batch_labels), hits1 + top1, hits5 + top5
    report(total, hits1, hits5)
    return hits1 / total, hits5 / total


def onnx_forward(onnx_model, images, labels, batch_size, iterations):
    """Do onnx model forward (ONNX Runtime on the CPU); returns top-1 and top-5 accuracy."""
    ort_session = ort.InferenceSession(onnx_model, providers=['CPUExecutionProvider'])
    total = hits1 = hits5 = 0
    for i, batch_images, batch_labels in batches(images, labels, batch_size, iterations):
        input_batch = prepare_image_input(batch_images)
        output = ort_session.run(None, {'input': input_batch.numpy()})
        top1, top5 = img_postprocess(output[0], batch_labels)
        report(len(batch_labels), top1, top5, iteration=i)
        total, hits1, hits5 = total + len(batch_labels), hits1 + top1, hits5 + top5
    report(total, hits1, hits5)
    return hits1 / total, hits5 / total


def main(args):
    """Sample main function; returns the exit code."""
    outputs = os.path.join(PATH, 'outputs/nuq' if args.nuq else 'outputs/calibration')
    tmp = os.path.join(outputs, 'tmp')
    try:
        images, labels = get_labels_from_txt(LABEL_FILE)
        model = resnet101(pretrained=True)
    except (InputError, FileNotFoundError) as err:
        print(f'[ERROR] {err}', file=sys.stderr)
        return 2
    images, labels = images[:BATCH_SIZE * ITERATIONS], labels[:BATCH_SIZE * ITERATIONS]
    model.eval()

    # Step 1: accuracy of the FP32 model
    ori_top1, ori_top5 = model_forward(model, images, labels, batch_size=BATCH_SIZE, iterations=ITERATIONS)

    # Step 2: quantization config. input_data only traces the model, so random data will do.
    args_shape = [(1, 3, 224, 224)]
    input_data = tuple([torch.randn(arg_shape) for arg_shape in args_shape])
    if torch.cuda.is_available():
        input_data = tuple([data.to('cuda') for data in input_data])
        model.to('cuda')
    config_json_file = os.path.join(tmp, 'config.json')
    skip_layers = []
    batch_num = 2
    if args.nuq:
        config_defination = os.path.join(PATH, 'src/nuq_conf/nuq_quant.cfg')
        try:
            amct.create_quant_config(config_json_file, model, input_data, skip_layers, batch_num,
                                     config_defination=config_defination)
        except amct.ConfigError as err:
            print(f'[ERROR] {err}', file=sys.stderr)
            return 2
    else:
        amct.create_quant_config(config_json_file, model, input_data, skip_layers, batch_num)

    # Step 3: conv+bn fusion, weight calibration, the fused ONNX model and the calibration model
    record_file = os.path.join(tmp, 'record.txt')
    modified_model = os.path.join(tmp, 'modified_model.onnx')
    calibration_model = amct.quantize_model(config_json_file, modified_model, record_file, model, input_data,
                                            input_names=['input'], output_names=['output'],
                                            dynamic_axes={'input': {0: 'batch_size'}, 'output': {0: 'batch_size'}})

    # Step 4: calibration: batch_num batches of the test images (32 each, or fewer when there are under 64 images)
    if len(images) < batch_num:
        print(f'[ERROR] calibration needs at least {batch_num} images, {IMG_DIR} has {len(images)}',
              file=sys.stderr)
        return 2
    calibration_batch = min(BATCH_SIZE, -(-len(images) // batch_num))
    model_forward(calibration_model, images, labels, batch_size=calibration_batch, iterations=batch_num)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # Step 5: the final models: fake-quant (ONNX Runtime simulation) and deploy (INT8 QDQ, for ATC)
    result_path = os.path.join(outputs, 'resnet-101')
    amct.save_model(modified_model, record_file, result_path)

    # Step 6: accuracy of the fake-quant model
    quant_top1, quant_top5 = onnx_forward(f'{result_path}_fake_quant_model.onnx', images, labels,
                                          batch_size=BATCH_SIZE, iterations=ITERATIONS)

    print(f'[INFO] ResNet101 before quantize top1:{ori_top1:>10} top5:{ori_top5:>10}')
    print(f'[INFO] ResNet101 after quantize  top1:{quant_top1:>10} top5:{quant_top5:>10}')
    return 0


if __name__ == '__main__':
    sys.exit(main(PARSER.parse_args()))
