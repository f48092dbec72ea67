#!/usr/bin/env python3
"""Show that a change to kernels/ left the kernels' machine code as it was.

Compiles every kernels/*.cu of a base revision (git show REV:kernels/...) and of the
working tree to cubins, for each arch, with build.rs's nvcc flags, then compares every
kernel wherever it now lives (any .cu), under optional renamings:
  - the bytes of its .text.<name> section (the machine code) and its relocations;
  - its .nv.info.<name> attributes (EIATTR_PARAM_CBANK's section index masked: it
    numbers the module's sections), its entries in the module's .nv.info (registers,
    frame and stack sizes), and the sizes of its .nv.shared / .nv.local / .nv.constant0
    sections.
Exit status 0 when every kernel of the base is found and identical, and none is new.

  python3 scripts/compare_kernels.py --base HEAD~1 --rename lk_lora_dora_=lk_dora_

Takes as long as two builds of the kernels for the given archs (default 90a and 80).
"""
import argparse
import concurrent.futures
import glob
import os
import shutil
import struct
import subprocess
import sys
import tempfile

FLAGS = ['-std=c++17', '-O3', '--use_fast_math', '-lineinfo']  # build.rs's NVCC_FLAGS


def find_nvcc(root):
    for p in [os.environ.get('NVCC'),
              os.path.join(os.environ.get('CUDA_PATH', '/nonexistent'), 'bin/nvcc'),
              shutil.which('nvcc'), '/usr/local/cuda/bin/nvcc',
              os.path.join(root, '.toolchain/cuda/nvidia/cu13/bin/nvcc')]:
        if p and os.path.isfile(p):
            return p
    sys.exit('nvcc not found (set NVCC)')


def compile_all(nvcc, src_dir, archs, jobs):
    out = os.path.join(src_dir, 'out')
    os.makedirs(out, exist_ok=True)
    work = [(cu, a) for cu in sorted(glob.glob(os.path.join(src_dir, '*.cu'))) for a in archs]

    def one(job):
        cu, a = job
        stem = os.path.splitext(os.path.basename(cu))[0]
        dst = os.path.join(out, f'{stem}.{a}.cubin')
        subprocess.run([nvcc, *FLAGS, '-cubin', f'-gencode=arch=compute_{a},code=sm_{a}',
                        '-I', src_dir, '-o', dst, cu], check=True)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, work))
    return out


def load(path):
    d = open(path, 'rb').read()
    assert d[:4] == b'\x7fELF' and d[4] == 2, path
    shoff, = struct.unpack_from('<Q', d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', d, 0x3A)
    hs = []
    for i in range(shnum):
        name, typ, _, _, off, size, link, info, _, _ = struct.unpack_from(
            '<IIQQQQIIQQ', d, shoff + i * shentsize)
        hs.append(dict(name=name, type=typ, off=off, size=size, link=link, info=info))

    def cstr(tab, o):
        b = d[tab['off'] + o:]
        return b[:b.index(0)].decode()
    for h in hs:
        h['sname'] = cstr(hs[shstrndx], h['name'])
        h['data'] = d[h['off']:h['off'] + h['size']] if h['type'] != 8 else b''
    syms = []
    for h in hs:
        if h['type'] == 2:  # SHT_SYMTAB
            for j in range(h['size'] // 24):
                nm, info, _, shndx, _, _ = struct.unpack_from('<IBBHQQ', h['data'], 24 * j)
                n = cstr(hs[h['link']], nm)
                if not n and info & 0xf == 3 and shndx < len(hs):  # a section's symbol
                    n = hs[shndx]['sname']
                syms.append(n)
    return hs, syms


def eiattrs(b):
    i, out = 0, []
    while i < len(b):
        fmt, attr = b[i], b[i + 1]
        if fmt == 4:  # EIFMT_SVAL: a 16-bit size, then the value
            sz, = struct.unpack_from('<H', b, i + 2)
            out.append((attr, b[i + 4:i + 4 + sz]))
            i += 4 + sz
        else:
            out.append((attr, b[i + 2:i + 4]))
            i += 4
    return out


def kernels(path):
    hs, syms = load(path)
    out = {}
    for i, h in enumerate(hs):
        if not h['sname'].startswith('.text.'):
            continue
        name = h['sname'][len('.text.'):]
        relocs = []
        for r in hs:
            if r['type'] in (4, 9) and r['info'] == i:  # SHT_RELA, SHT_REL
                es = 24 if r['type'] == 4 else 16
                for j in range(r['size'] // es):
                    o, inf = struct.unpack_from('<QQ', r['data'], es * j)
                    add = struct.unpack_from('<q', r['data'], es * j + 16)[0] if es == 24 else 0
                    relocs.append((o, inf & 0xffffffff, syms[inf >> 32], add))
        attrs = {}
        for h2 in hs:
            n2 = h2['sname']
            for pre in ('.nv.shared.', '.nv.local.', '.nv.constant0.'):
                if n2 == pre + name:
                    attrs[pre] = h2['size']
            if n2 == '.nv.info.' + name:
                attrs['info'] = [(a, v[4:] if a == 0x0a else v) for a, v in eiattrs(h2['data'])]
            if n2 == '.nv.info':  # module-wide (symbol, value) entries
                attrs['module info'] = sorted(
                    (a, v[4:]) for a, v in eiattrs(h2['data'])
                    if len(v) == 8 and syms[struct.unpack_from('<I', v)[0]] == name)
        out[name] = ((h['data'], sorted(relocs)), attrs)
    return out


def main():
    root = subprocess.run(['git', 'rev-parse', '--show-toplevel'], capture_output=True,
                          text=True, check=True).stdout.strip()
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--base', default='HEAD', help='the revision to compare against')
    ap.add_argument('--archs', default='90a,80', help='comma-separated: 90a,80,86,89')
    ap.add_argument('--rename', action='append', default=[], metavar='OLD=NEW',
                    help='a kernel name prefix renamed since the base (repeatable)')
    ap.add_argument('--keep', help='compile into this directory and keep it')
    ap.add_argument('--jobs', type=int, default=os.cpu_count())
    args = ap.parse_args()
    renames = [r.split('=', 1) for r in args.rename]
    archs = args.archs.split(',')
    nvcc = find_nvcc(root)
    tmp = args.keep or tempfile.mkdtemp(prefix='lk-compare-')
    dirs = {}
    for side in ('base', 'tree'):
        d = os.path.join(tmp, side)
        os.makedirs(d, exist_ok=True)
        dirs[side] = d
    names = subprocess.run(['git', 'ls-tree', '--name-only', f'{args.base}:kernels'], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split()
    for n in names:
        blob = subprocess.run(['git', 'show', f'{args.base}:kernels/{n}'], cwd=root,
                              capture_output=True, check=True).stdout
        open(os.path.join(dirs['base'], n), 'wb').write(blob)
    for p in glob.glob(os.path.join(root, 'kernels', '*')):
        shutil.copy(p, dirs['tree'])
    outs = {side: compile_all(nvcc, d, archs, args.jobs) for side, d in dirs.items()}

    def renamed(n):
        for old, new in renames:
            if n.startswith(old):
                return new + n[len(old):]
        return n
    bad = 0
    for a in archs:
        old, new = {}, {}
        for p in sorted(glob.glob(os.path.join(outs['base'], f'*.{a}.cubin'))):
            for k, v in kernels(p).items():
                old[renamed(k)] = (os.path.basename(p).split('.')[0], k, v)
        for p in sorted(glob.glob(os.path.join(outs['tree'], f'*.{a}.cubin'))):
            for k, v in kernels(p).items():
                assert k not in new, f'{k} in two modules'
                new[k] = (os.path.basename(p).split('.')[0], k, v)
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        common = sorted(set(old) & set(new))
        text_same = attr_same = moved = 0
        for k in common:
            (of, ok, (ot, oa)), (nf, nk, (nt, na)) = old[k], new[k]
            moved += (of, ok) != (nf, nk)
            if ot == nt:
                text_same += 1
            else:
                print(f'  machine code differs, sm_{a}: {of}.cu:{ok} -> {nf}.cu:{nk}')
            if oa == na:
                attr_same += 1
            else:
                print(f'  attributes differ, sm_{a}: {of}.cu:{ok} -> {nf}.cu:{nk}: '
                      f'{[x for x in set(oa) | set(na) if oa.get(x) != na.get(x)]}')
        print(f'sm_{a}: {len(common)} kernels compared: machine code identical for '
              f'{text_same}, attributes for {attr_same}; {moved} moved or renamed; '
              f'missing: {missing or "none"}; new: {extra or "none"}')
        bad += 2 * len(common) - text_same - attr_same + len(missing) + len(extra)
    if not args.keep:
        shutil.rmtree(tmp)
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
