from .metrics import psnr, ssim
