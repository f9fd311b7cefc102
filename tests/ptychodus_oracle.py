"""Test oracle: ptychodus 1.7.0's own readers and writers, run inside the ptychodus venv.

Never imported by ptycho_ml; ``tests/test_ptychodus.py`` runs it as a subprocess:

``python ptychodus_oracle.py read DIFFRACTION_H5 PRODUCT_H5 OUT_NPZ``
    opens the pair with ptychodus (the plugin registry's ``HDF5`` product reader,
    ``ptychodus.api.io.load_diffraction_data`` and ``prepare_reconstruct_input``,
    i.e. what a ptychodus reconstruction does), writes the arrays it got to
    OUT_NPZ and prints the scalars as one JSON line.

``python ptychodus_oracle.py write IN_NPZ OUT_DIR``
    builds a ptychodus ``Product`` and ``AssembledDiffractionData`` from the arrays
    in IN_NPZ (scalars in its ``meta`` JSON member) and writes OUT_DIR/product.h5
    (registry ``HDF5`` product writer), OUT_DIR/diffraction.h5
    (``save_diffraction_data``), OUT_DIR/ptychopinn.npz
    (``save_ptychopinn_training_data``) and OUT_DIR/expected.npz (ptychodus's own
    object-pixel positions of the paired scan); prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy


def _registry():
    from ptychodus.api.plugins import PluginRegistry

    return PluginRegistry.load_plugins()


def read(diffraction_file: str, product_file: str, out_file: str) -> dict:
    from ptychodus.api.io import load_diffraction_data
    from ptychodus.api.reconstruct import prepare_reconstruct_input

    product = _registry().product_file_readers.get_strategy_by_name('HDF5').read(Path(product_file))
    assembled = load_diffraction_data(Path(diffraction_file))
    paired = prepare_reconstruct_input(assembled, product)

    geometry = product.object_.get_geometry()
    positions = product.probe_positions
    paired_positions = paired.product.probe_positions
    meta = product.metadata
    probe_pixels = product.probes.get_pixel_geometry()
    detector_pixels = assembled.get_pixel_geometry()
    numpy.savez(
        out_file,
        object=product.object_.get_array(),
        probe=product.probes.get_array(),
        position_indexes=positions.get_indexes(),
        x_m=positions.get_coordinates_x_m(),
        y_m=positions.get_coordinates_y_m(),
        x_px=geometry.map_probe_positions_to_object_x_px(positions),
        y_px=geometry.map_probe_positions_to_object_y_px(positions),
        pattern_indexes=assembled.get_indexes(),
        patterns=assembled.get_patterns(),
        bad_pixels=assembled.get_bad_pixels(),
        paired_indexes=paired_positions.get_indexes(),
        paired_x_px=geometry.map_probe_positions_to_object_x_px(paired_positions),
        paired_y_px=geometry.map_probe_positions_to_object_y_px(paired_positions),
        paired_patterns=paired.diffraction_patterns,
        loss_epochs=numpy.array([loss.epoch for loss in product.losses]),
        loss_values=numpy.array([loss.value for loss in product.losses]),
    )
    return {
        'ptychodus_version': version('ptychodus'),
        'name': meta.name,
        'comments': meta.comments,
        'detector_object_distance_m': meta.detector_distance_m,
        'photon_energy_eV': meta.photon_energy_eV,
        'probe_photon_count': meta.probe_photon_count,
        'exposure_time_s': meta.exposure_time_s,
        'far_field': meta.far_field,
        'object_width_px': geometry.width_px,
        'object_height_px': geometry.height_px,
        'object_pixel_width_m': geometry.pixel_width_m,
        'object_pixel_height_m': geometry.pixel_height_m,
        'object_center_x_m': geometry.center_x_m,
        'object_center_y_m': geometry.center_y_m,
        'object_num_layers': int(product.object_.get_array().shape[0]),
        'probe_pixel_width_m': probe_pixels.width_m,
        'probe_pixel_height_m': probe_pixels.height_m,
        'probe_num_coherent_modes': product.probes.num_coherent_modes,
        'probe_num_incoherent_modes': product.probes.num_incoherent_modes,
        'detector_pixel_width_m': detector_pixels.width_m,
        'detector_pixel_height_m': detector_pixels.height_m,
        'patterns_dtype': str(assembled.get_patterns().dtype),
        'num_positions': len(positions),
        'num_paired': len(paired_positions),
    }


def write(in_file: str, out_dir: str) -> dict:
    from ptychodus.api.assemble import AssembledDiffractionData
    from ptychodus.api.geometry import PixelGeometry
    from ptychodus.api.io import save_diffraction_data, save_ptychopinn_training_data
    from ptychodus.api.object import Object, ObjectCenter
    from ptychodus.api.probe import ProbeSequence
    from ptychodus.api.probe_positions import ProbePosition, ProbePositionSequence
    from ptychodus.api.product import LossValue, Product, ProductMetadata
    from ptychodus.api.reconstruct import prepare_reconstruct_input

    data = numpy.load(in_file)
    meta = json.loads(str(data['meta']))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    object_pixels = PixelGeometry(width_m=meta['object_pixel_width_m'], height_m=meta['object_pixel_height_m'])
    product = Product(
        metadata=ProductMetadata(
            name=meta['name'],
            comments=meta['comments'],
            detector_distance_m=meta['detector_object_distance_m'],
            photon_energy_eV=meta['photon_energy_eV'],
            probe_photon_count=meta['probe_photon_count'],
            exposure_time_s=meta['exposure_time_s'],
            mass_attenuation_m2_per_kg=0.0,
            tomography_angle_deg=0.0,
        ),
        probe_positions=ProbePositionSequence(
            [ProbePosition(int(i), float(x), float(y))
             for i, x, y in zip(data['position_indexes'], data['x_m'], data['y_m'])]
        ),
        probes=ProbeSequence(array=data['probe'], opr_weights=None, pixel_geometry=object_pixels),
        object_=Object(
            array=data['object'],
            pixel_geometry=object_pixels,
            center=ObjectCenter(x_m=meta['object_center_x_m'], y_m=meta['object_center_y_m']),
            layer_spacing_m=list(meta.get('object_layer_spacing_m', [])),
        ),
        losses=[LossValue(int(e), float(v)) for e, v in zip(data['loss_epochs'], data['loss_values'])],
    )
    _registry().product_file_writers.get_strategy_by_name('HDF5').write(out / 'product.h5', product)

    assembled = AssembledDiffractionData(
        indexes=data['pattern_indexes'],
        patterns=data['patterns'],
        pixel_geometry=PixelGeometry(width_m=meta['detector_pixel_width_m'], height_m=meta['detector_pixel_height_m']),
        bad_pixels=data['bad_pixels'],
    )
    save_diffraction_data(out / 'diffraction.h5', assembled)

    paired = prepare_reconstruct_input(assembled, product)
    save_ptychopinn_training_data(out / 'ptychopinn.npz', paired, inpaint_bad_pixels=False)
    geometry = product.object_.get_geometry()
    positions = paired.product.probe_positions
    numpy.savez(
        out / 'expected.npz',
        indexes=positions.get_indexes(),
        x_px=geometry.map_probe_positions_to_object_x_px(positions),
        y_px=geometry.map_probe_positions_to_object_y_px(positions),
        patterns=paired.diffraction_patterns,
    )
    return {'ptychodus_version': version('ptychodus'), 'num_paired': len(positions)}


if __name__ == '__main__':
    mode, *args = sys.argv[1:]
    result = {'read': read, 'write': write}[mode](*args)
    print(json.dumps(result))
