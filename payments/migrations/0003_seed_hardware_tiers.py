"""Seed the hardware tiers with Replicate's public per-second prices (replicate.com/pricing)."""

from decimal import Decimal

from django.db import migrations

TIERS = [
    ("cpu", "CPU", "0.000100"),
    ("gpu-t4", "Nvidia T4 GPU", "0.000225"),
    ("gpu-a40-small", "Nvidia A40 GPU", "0.000575"),
    ("gpu-a40-large", "Nvidia A40 (Large) GPU", "0.000725"),
    ("gpu-a40-large-2x", "2x Nvidia A40 (Large) GPU", "0.001450"),
    ("gpu-a40-large-4x", "4x Nvidia A40 (Large) GPU", "0.002900"),
    ("gpu-a40-large-8x", "8x Nvidia A40 (Large) GPU", "0.005800"),
    ("gpu-l40s", "Nvidia L40S GPU", "0.000975"),
    ("gpu-l40s-2x", "2x Nvidia L40S GPU", "0.001950"),
    ("gpu-l40s-4x", "4x Nvidia L40S GPU", "0.003900"),
    ("gpu-l40s-8x", "8x Nvidia L40S GPU", "0.007800"),
    ("gpu-a100-80gb", "Nvidia A100 (80GB) GPU", "0.001400"),
    ("gpu-a100-80gb-2x", "2x Nvidia A100 (80GB) GPU", "0.002800"),
    ("gpu-a100-80gb-4x", "4x Nvidia A100 (80GB) GPU", "0.005600"),
    ("gpu-a100-80gb-8x", "8x Nvidia A100 (80GB) GPU", "0.011200"),
    ("gpu-h100", "Nvidia H100 GPU", "0.001525"),
    ("gpu-h100-2x", "2x Nvidia H100 GPU", "0.003050"),
    ("gpu-h100-4x", "4x Nvidia H100 GPU", "0.006100"),
    ("gpu-h100-8x", "8x Nvidia H100 GPU", "0.012200"),
]


def seed(apps, schema_editor):
    HardwareTier = apps.get_model("payments", "HardwareTier")
    for slug, name, price in TIERS:
        HardwareTier.objects.get_or_create(
            slug=slug, defaults={"name": name, "price_per_second": Decimal(price)}
        )


def unseed(apps, schema_editor):
    apps.get_model("payments", "HardwareTier").objects.filter(slug__in=[t[0] for t in TIERS]).delete()


class Migration(migrations.Migration):
    dependencies = [("payments", "0002_initial")]
    operations = [migrations.RunPython(seed, unseed)]
