"""Predicting the protein image from the nucleus image and the protein's identity.

After the OpenCell nucleus-to-protein work: a conditional U-Net trained with
squared error, and pix2pix (the same U-Net as generator against a PatchGAN
discriminator), scored by pixel correlation on held-out fields of view beside
each protein's mean image.

    model.py     ConditionalUNet (protein embedding, FiLM), PatchDiscriminator
    train.py     jitted steps of both, trained in the shared loop (`loop.fit`):
                 checkpointed after every epoch, resumable
    evaluate.py  pixel correlation and MSE per localization, with the baseline
    figures.py   nucleus | real | U-Net | GAN grid
    config.py    PredictConfig, the settings of a `predict` run
    run.py       the `predict` command: train, evaluate, write
"""
