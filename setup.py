"""Install cdnsr_plugin. ``pip install .`` also installs ``cdnsr_plugin-autoload.pth`` into
site-packages, which registers the plugin whenever basicsr is imported (see _cdnsr_plugin_autoload.py;
disable with CDNSR_PLUGIN_AUTOLOAD=0)."""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = 'cdnsr_plugin-autoload.pth'
# under options/; installed flat in cdnsr_plugin/options/
PACKAGED_OPTIONS = ['demo/train_CDNSR_FSRCNN_oracle_demo.yml']
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithPth(build_py):
    """Copy the .pth start-up file to the root of the build, i.e. into site-packages."""

    def run(self):
        super().run()
        shutil.copyfile(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))
        for name in PACKAGED_OPTIONS:  # the demo reads its schedule from the installed package
            target = os.path.join(self.build_lib, 'cdnsr_plugin', 'options', os.path.basename(name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(HERE, 'options', name), target)

    def get_outputs(self, include_bytecode=True):
        packaged = [
            os.path.join(self.build_lib, 'cdnsr_plugin', 'options', os.path.basename(name)) for name in PACKAGED_OPTIONS
        ]
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)] + packaged


def read(name):
    with open(os.path.join(HERE, name), encoding='utf-8') as handle:
        return handle.read()


setup(
    name='cdnsr_plugin',
    version='0.1.0',
    description='Content-adaptive super-resolution (ClassSR, CDNSR) as a BasicSR plugin',
    long_description=read('README.md'),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    packages=find_packages(include=['cdnsr_plugin', 'cdnsr_plugin.*']),
    py_modules=['_cdnsr_plugin_autoload'],
    package_data={'cdnsr_plugin.weights': ['*.pth', '*.json', '*.yml']},
    cmdclass={'build_py': BuildWithPth},
    install_requires=[
        'torch>=1.13',
        'torchvision>=0.14',
        'basicsr>=1.4.2,<1.5',
        'mmengine>=0.8',
        'lmdb>=1.0',
        'opencv-python>=4.5',
        'scipy>=1.7',
        'ptflops>=0.7.3',
        'matplotlib>=3.5',
        'scikit-image>=0.19',
        'numpy',
        'pyyaml',
        'tqdm',
    ],
    extras_require={
        'test': ['pytest>=7', 'hypothesis>=6', 'flake8>=6', 'isort>=5', 'yapf>=0.32'],
        'onnx': ['onnx>=1.14', 'onnxruntime>=1.16'],
    },
    entry_points={
        'console_scripts': [
            'cdnsr-train=cdnsr_plugin.train:main',
            'cdnsr-test=cdnsr_plugin.test:main',
            'cdnsr-test-patches=cdnsr_plugin.tester.cli:main',
            'cdnsr-demo=cdnsr_plugin.demo:main',
            'cdnsr-sr=cdnsr_plugin.run:main',
        ]
    },
    license='Apache-2.0',
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Image Processing'],
)
