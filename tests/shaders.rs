//! Every WGSL module parses and validates with naga, and every variant the engine builds
//! translates to SPIR-V (with the bounds-check policy wgpu uses), MSL, HLSL and GLSL. No GPU needed.

use spotlight::kernels::{CoopTiles, FlashLayout, FlashTiles, Shader, Variant, source};
use spotlight::reference::DType;
use spotlight::{BackwardPass, BackwardTiles};

fn module(src: &str, name: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: parse error:\n{}", e.emit_to_string(src)));
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: validation error: {e:?}"));
    (module, info)
}

/// Every variant the engine can build: all dtypes, the head dims and tile shapes the tile chooser
/// produces on 32 KiB and 48 KiB adapters.
fn variants() -> Vec<Variant> {
    let dts = [DType::F32, DType::F16, DType::Bf16];
    let mut out = vec![Variant::softmax(), Variant::stream()];
    // Every f16 variant again, reading f16 natively (SHADER_F16).
    let natives = |v: &[Variant]| -> Vec<Variant> {
        v.iter()
            .filter_map(|x| {
                let n = x.clone().native_f16(true);
                n.native_f16.then_some(n)
            })
            .collect()
    };
    for a in [DType::F32, DType::F16, DType::Bf16] {
        out.push(Variant::lens(a, a));
    }
    for a in dts {
        out.push(Variant::pv(a));
        out.push(Variant::pack(a));
        out.push(Variant::merge(a));
        for b in dts {
            out.push(Variant::linear(a, b));
            out.push(Variant::scores(a, b));
        }
    }
    for (d, dv) in [
        (16, 16),
        (40, 40),
        (64, 64),
        (80, 96),
        (128, 128),
        (256, 256),
        (256, 512),
    ] {
        for mem in [32 * 1024, 48 * 1024] {
            for rows in [64, 4] {
                let Some(t) = FlashTiles::choose(d, dv, mem, 256, rows) else {
                    continue;
                };
                for dt in dts {
                    for (gqa, paged) in [(false, false), (true, false), (true, true), (false, true)]
                    {
                        let v = Variant::flash([dt, dt, dt], d, dv, t, gqa, paged);
                        // Wide K/V loads where the dims allow them (rows 4-aligned).
                        if d % 4 == 0 && dv % 4 == 0 && gqa == paged {
                            out.push(v.clone().vec4_kv(true));
                        }
                        // O written as f16 or bf16 words by the kernel (Dv even; its own
                        // storage dtype, K/V wide when they can be).
                        if dv % 2 == 0 && !gqa && !paged && dt != DType::F32 {
                            let wide = d % 4 == 0 && dv % 4 == 0;
                            out.push(v.clone().vec4_kv(wide).out_half(Some(dt)));
                        }
                        out.push(v);
                    }
                }
            }
        }
        // The row kernel for CPU adapters: AVX2 (8 lanes; 8 and 16 rows), SSE (4) and, unused but
        // legal, 32.
        for (lanes, r) in [(8, 8), (8, 16), (8, 32), (4, 8), (4, 32), (32, 8), (32, 32)] {
            for dt in dts {
                for (gqa, paged) in [(false, false), (true, false), (true, true)] {
                    let t = FlashTiles::rows(lanes, r);
                    if !t.fits(d, dv, 48 * 1024) {
                        continue;
                    }
                    let v = Variant::flash([dt, dt, dt], d, dv, t, gqa, paged);
                    if d % 4 == 0 && dv % 4 == 0 {
                        out.push(v.clone().vec4_kv(true));
                        out.push(v.clone().vec4_kv(true).plain_logits(true));
                    }
                    // O written as f16 or bf16 words by the kernel (Dv even).
                    if dv % 2 == 0 {
                        out.push(v.clone().plain_logits(true).out_half(Some(DType::F16)));
                        out.push(v.clone().out_half(Some(DType::Bf16)));
                    }
                    // P·V's branch on finite V (Engine::finite_v_branch: llvmpipe's 8 lanes),
                    // both logit paths.
                    if !gqa && lanes == 8 {
                        out.push(v.clone().finite_v_branch(true));
                        out.push(v.clone().plain_logits(true).finite_v_branch(true));
                    }
                    out.push(v.clone().plain_logits(true));
                    out.push(v);
                }
            }
        }
    }
    // The decode kernel: 1, 4 and 16 rows per unit, 128 threads (64 where memory is short),
    // every dtype, packed or not, paged or not, wide loads or not, tile max through subgroups
    // or not.
    for (d, dv) in [(16, 16), (64, 64), (128, 128), (80, 96)] {
        for (rows, threads) in [(1, 128), (4, 128), (16, 64)] {
            let t = FlashTiles::decode(rows, threads);
            if !t.fits(d, dv, 48 * 1024) {
                continue;
            }
            for dt in dts {
                for (gqa, paged) in [(false, false), (true, false), (true, true)] {
                    let v = Variant::flash([dt, dt, dt], d, dv, t, gqa, paged);
                    if d % 4 == 0 && dv % 4 == 0 {
                        out.push(v.clone().vec4_kv(true));
                        out.push(v.clone().vec4_kv(true).subgroup_rows(true));
                    }
                    out.push(v.clone().subgroup_rows(true));
                    if dv % 2 == 0 && gqa && !paged {
                        out.push(
                            v.clone()
                                .subgroup_rows(dt == DType::F16)
                                .out_half(Some(DType::F16)),
                        );
                        out.push(v.clone().out_half(Some(DType::Bf16)));
                    }
                    out.push(v);
                }
            }
        }
    }
    // The backward's main passes: tiled (lavapipe's and NVIDIA's workgroup memory) and the row
    // kernels (8, 4 and 32 lanes; 16 below), every dtype, dO in f32 and f16, with and without dS
    // (the row key/value pass also with stored gradients, and the dQ pass that reads them).
    for (d, dv) in [(16, 16), (40, 24), (64, 64), (128, 128), (256, 256)] {
        let mut tiles: Vec<BackwardTiles> = [32 * 1024, 48 * 1024]
            .iter()
            .filter_map(|&mem| BackwardTiles::choose(d, dv, mem, 256))
            .collect();
        tiles.extend([(8, 8), (4, 8), (8, 16), (32, 8)].map(|(n, r)| BackwardTiles::rows(n, r)));
        // 16 lanes (lavapipe on 512-bit vectors) and four rows per lane after the reduce-scatter
        // (4 lanes, 16 rows): f32 only, two head-dim pairs, to bound this list's translation time.
        let extra = [(16, 16), (16, 8), (4, 16)].map(|(n, r)| BackwardTiles::rows(n, r));
        let narrow = matches!((d, dv), (40, 24) | (64, 64));
        for t in tiles
            .into_iter()
            .chain(extra.into_iter().filter(|_| narrow))
        {
            let only_f32 = extra.contains(&t);
            for dt in dts {
                if only_f32 && dt != DType::F32 {
                    continue;
                }
                let rows = t.layout == FlashLayout::Rows;
                for (query, write_ds) in
                    [(false, false), (true, false), (true, true), (false, rows)]
                {
                    let d_out = if write_ds { DType::F16 } else { DType::F32 };
                    let v = Variant::backward_main(query, [dt, dt, dt], d_out, d, dv, t, write_ds);
                    if t.layout == FlashLayout::Rows && d % 4 == 0 && dv % 4 == 0 {
                        out.push(v.clone().vec4_kv(true));
                        // Without the general per-logit path (problems with only bands).
                        if !write_ds || !query {
                            out.push(v.clone().vec4_kv(true).plain_logits(true));
                        }
                    }
                    out.push(v);
                }
                if rows {
                    let v = Variant::backward_dq_rows([dt, dt, dt], d, dv, t);
                    if d % 4 == 0 {
                        out.push(v.clone().vec4_kv(true));
                    }
                    out.push(v);
                }
            }
        }
    }
    let native = natives(&out);
    assert!(
        native.len() > 20,
        "too few native-f16 variants: {}",
        native.len()
    );
    out.extend(native);
    // Every fused variant again with subgroup row reductions.
    let sg: Vec<Variant> = out
        .iter()
        .filter(|v| v.shader() == Shader::Flash)
        .map(|v| v.clone().subgroup_rows(true))
        .collect();
    assert!(sg.len() > 20);
    out.extend(sg);
    // The cooperative-matrix kernel at both matrix edges, with the tiles the chooser gives on
    // lavapipe (edge 8, subgroups of 8, 32 KiB), NVIDIA (16, 32, 48 KiB) and AMD (16, 64).
    for (edge, wg, mem) in [(8, 8, 32768), (16, 32, 49152), (16, 64, 65536)] {
        for (d, dv) in [
            (16, 16),
            (64, 64),
            (128, 128),
            (96, 64),
            (256, 256),
            (8, 24),
        ] {
            if d % edge != 0 || dv % edge != 0 {
                continue;
            }
            let tiles = CoopTiles::choose(edge, wg, d, dv, mem, 1024)
                .unwrap_or_else(|| panic!("no coop tiles for edge {edge} D={d} Dv={dv}"));
            assert!(tiles.bytes(d, dv) <= mem && tiles.bk.is_multiple_of(edge));
            for dt in [DType::F16, DType::Bf16, DType::F32] {
                let v = Variant::flash_coop([dt, dt, dt], d, dv, tiles);
                out.push(v.clone().native_f16(true));
                // Its half outputs (written by the kernel itself, without the pack pass).
                let half = if dt == DType::F32 { DType::Bf16 } else { dt };
                out.push(v.clone().out_half(Some(half)).native_f16(true));
                out.push(v);
            }
        }
    }
    out
}

#[test]
fn every_shader_file_is_used_by_a_module() {
    // half_out.wgsl replaces a function of the scalar fused kernels in their half-output
    // variants only.
    let half_rows = Variant::flash(
        [DType::F32; 3],
        64,
        64,
        FlashTiles::rows(8, 16),
        false,
        false,
    )
    .out_half(Some(DType::F16))
    .source();
    for (name, src) in source::FILES {
        let used =
            Shader::ALL.iter().any(|s| s.template().contains(src)) || half_rows.contains(src);
        assert!(used, "{name} is in shaders/ but no kernel includes it");
    }
    // And every file in shaders/ is one of them (a file the list forgot would go unchecked).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shaders");
    let mut on_disk = 0;
    for entry in std::fs::read_dir(dir).expect("shaders/") {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name.ends_with(".wgsl") {
            on_disk += 1;
            assert!(
                source::FILES.iter().any(|(n, _)| *n == name),
                "shaders/{name} is not in kernels::source::FILES"
            );
        }
    }
    assert_eq!(
        on_disk,
        source::FILES.len(),
        "FILES lists a file not in shaders/"
    );
}

#[test]
fn every_module_parses_and_validates() {
    for shader in Shader::ALL {
        let (module, _) = module(&shader.source(), shader.name());
        assert!(
            module.entry_points.iter().any(|e| e.name == "main"),
            "{} has no main entry point",
            shader.name()
        );
    }
}

/// The typed configurations name every variant apart: distinct variants never share a label
/// (pipeline errors and GPU captures name the variant), and equal names mean equal variants.
#[test]
fn every_variant_has_its_own_name() {
    let mut seen = std::collections::HashMap::new();
    let vs = variants();
    for v in &vs {
        if let Some(other) = seen.insert(v.name(), v.clone()) {
            assert_eq!(&other, v, "two variants named {}", v.name());
        }
    }
    assert!(seen.len() > 500, "only {} distinct variants", seen.len());
    // The switches that only some kernels have change nothing elsewhere.
    let rows = Variant::flash(
        [DType::F16; 3],
        64,
        64,
        FlashTiles::rows(8, 8),
        false,
        false,
    );
    assert_eq!(rows.clone().subgroup_rows(true), rows);
    assert_ne!(rows.clone().plain_logits(true), rows);
    let half = rows.clone().out_half(Some(DType::Bf16));
    assert_ne!(half, rows);
    assert!(half.name().contains("_out-bf16"), "{}", half.name());
    assert_eq!(rows.clone().out_half(Some(DType::F32)), rows);
    assert!(half.source().contains("array<u32>;\n@group(0) @binding(8)"));
    assert!(rows.source().contains("out: array<f32>;"));
    assert!(rows.clone().plain_logits(true).name().ends_with("_plain"));
    let fvb = rows.clone().finite_v_branch(true);
    assert_ne!(fvb, rows);
    assert!(fvb.name().ends_with("_fvb"), "{}", fvb.name());
    assert!(fvb.source().contains("override FINITE_V_BRANCH"));
    // The backward's row kernels have the same switch; the tiled ones do not.
    let bw_rows = Variant::backward_main(
        false,
        [DType::F32; 3],
        DType::F32,
        64,
        64,
        BackwardTiles::rows(8, 16),
        true,
    );
    let plain = bw_rows.clone().plain_logits(true);
    assert_ne!(plain, bw_rows);
    assert!(plain.name().contains("_plain"), "{}", plain.name());
    let bw_tiled = Variant::backward_main(
        true,
        [DType::F32; 3],
        DType::F32,
        64,
        64,
        BackwardTiles::choose(64, 64, 32 * 1024, 256).expect("tiles"),
        false,
    );
    assert_eq!(bw_tiled.clone().plain_logits(true), bw_tiled);
    let tiled = FlashTiles::choose(64, 64, 32 * 1024, 256, 64).expect("tiles");
    let tiled = Variant::flash([DType::F16; 3], 64, 64, tiled, false, false);
    assert_ne!(tiled.clone().vec4_kv(true), tiled);
    assert_ne!(rows.clone().vec4_kv(true), rows);
    assert_ne!(tiled.clone().subgroup_rows(true), tiled);
    assert_eq!(tiled.clone().plain_logits(true), tiled);
    assert_eq!(tiled.clone().finite_v_branch(true), tiled);
    // The tiled and decode kernels' half outputs, as the row kernel's.
    let decode_half = Variant::flash(
        [DType::F32; 3],
        64,
        64,
        FlashTiles::decode(4, 128),
        true,
        false,
    )
    .out_half(Some(DType::F16));
    for half in [tiled.clone().out_half(Some(DType::Bf16)), decode_half] {
        assert!(half.name().contains("_out-"), "{}", half.name());
        let src = half.source();
        assert!(src.contains("out: array<u32>;"), "{}", half.name());
        assert!(
            src.contains("to_half(o.z) | (to_half(o.w) << 16u)"),
            "{}",
            half.name()
        );
    }
    assert!(tiled.source().contains("out: array<f32>;"));
    // The decode kernel's tile max: subgroupMax and the subgroup builtins only in its subgroup
    // variant (a module that names them fails on a device without subgroups).
    let decode = Variant::flash(
        [DType::F16; 3],
        128,
        128,
        FlashTiles::decode(4, 128),
        true,
        false,
    );
    let sg = decode.clone().subgroup_rows(true);
    assert_ne!(sg, decode);
    assert!(sg.name().contains("_sg"), "{}", sg.name());
    let (with, without) = (sg.source(), decode.source());
    for builtin in [
        "subgroupMax(",
        "@builtin(subgroup_id)",
        "@builtin(num_subgroups)",
    ] {
        assert!(with.contains(builtin), "{} lacks {builtin}", sg.name());
        assert!(
            !without.contains(builtin),
            "{} has {builtin}",
            decode.name()
        );
    }
    let coop = CoopTiles::choose(16, 32, 64, 64, 49152, 1024).expect("coop tiles");
    let coop = Variant::flash_coop([DType::F16; 3], 64, 64, coop);
    assert_eq!(coop.clone().vec4_kv(true), coop);
    assert_eq!(coop.clone().subgroup_rows(true), coop);
    assert_eq!(coop.clone().plain_logits(true), coop);
    // The matrix-unit kernel's half output, as the scalar kernels': O bound as words and stored
    // through half_out.wgsl, named by its dtype; f32 changes nothing.
    assert_eq!(coop.clone().out_half(Some(DType::F32)), coop);
    let coop_half = coop.clone().out_half(Some(DType::F16));
    assert_ne!(coop_half, coop);
    assert!(
        coop_half.name().contains("_out-f16"),
        "{}",
        coop_half.name()
    );
    let src = coop_half.source();
    assert!(src.contains("out: array<u32>;"), "{}", coop_half.name());
    assert!(src.contains("to_half(o.z) | (to_half(o.w) << 16u)"));
    assert!(coop.source().contains("out: array<f32>;"));
}

#[test]
fn every_variant_translates_to_every_backend() {
    let vs = variants();
    assert!(vs.len() > 30, "expected many variants, got {}", vs.len());
    for variant in vs {
        let name = variant.name();
        let (module, info) = module(&variant.source(), &name);
        let constants: naga::back::PipelineConstants = variant
            .constants()
            .iter()
            .map(|&(k, v)| (k.to_string(), v as f64))
            .collect();
        let (module, info) =
            naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
                .unwrap_or_else(|e| panic!("{name}: overrides: {e:?}"));
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: "main".into(),
        };
        let spv_opts = naga::back::spv::Options {
            bounds_check_policies: naga::proc::BoundsCheckPolicies {
                index: naga::proc::BoundsCheckPolicy::Restrict,
                buffer: naga::proc::BoundsCheckPolicy::Restrict,
                image_load: naga::proc::BoundsCheckPolicy::Restrict,
                binding_array: naga::proc::BoundsCheckPolicy::Restrict,
            },
            ..Default::default()
        };
        let spv = naga::back::spv::write_vec(&module, &info, &spv_opts, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e:?}"));
        assert!(spv.len() > 100, "{name}: SPIR-V suspiciously small");

        let msl_pipeline = naga::back::msl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, "main".into())),
            ..Default::default()
        };
        // MSL 2.1: simdgroup shuffles need 2.0.
        let msl_opts = naga::back::msl::Options {
            lang_version: if variant.shader() == Shader::FlashCoop {
                (2, 3)
            } else {
                (2, 1)
            },
            ..Default::default()
        };
        let (msl, _) = naga::back::msl::write_string(&module, &info, &msl_opts, &msl_pipeline)
            .unwrap_or_else(|e| panic!("{name}: MSL: {e:?}"));
        assert!(msl.contains("kernel"), "{name}: MSL has no kernel");

        if variant.shader() == Shader::FlashCoop {
            // Recorded: naga translates cooperative matrices to SPIR-V and MSL only, so the
            // engine builds this kernel only on Vulkan and Metal adapters that offer them.
            continue;
        }
        let mut hlsl = String::new();
        // f16 needs shader model 6.2 on DX12.
        let hlsl_opts = naga::back::hlsl::Options {
            shader_model: if variant.native_f16 || variant.name().contains("_sg") {
                naga::back::hlsl::ShaderModel::V6_2
            } else {
                naga::back::hlsl::Options::default().shader_model
            },
            ..Default::default()
        };
        naga::back::hlsl::Writer::new(&mut hlsl, &hlsl_opts, &Default::default())
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{name}: HLSL: {e:?}"));
        assert!(
            hlsl.contains("numthreads"),
            "{name}: HLSL has no numthreads"
        );

        if variant.native_f16 || variant.name().contains("_sg") {
            // Recorded: GLSL ES 3.1 has no 16-bit storage and no subgroup operations, and wgpu's
            // GL backend offers neither SHADER_F16 nor SUBGROUP, so the engine never builds
            // these variants there.
            continue;
        }
        let mut glsl = String::new();
        let glsl_opts = naga::back::glsl::Options {
            version: naga::back::glsl::Version::Embedded {
                version: 310,
                is_webgl: false,
            },
            ..Default::default()
        };
        let glsl_pipeline = naga::back::glsl::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: "main".into(),
            multiview: None,
        };
        naga::back::glsl::Writer::new(
            &mut glsl,
            &module,
            &info,
            &glsl_opts,
            &glsl_pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write().map(|_| ()))
        .unwrap_or_else(|e| panic!("{name}: GLSL: {e:?}"));
        assert!(
            glsl.contains("local_size_x"),
            "{name}: GLSL has no local_size_x"
        );
    }
}

// ---- Host <-> WGSL contracts, checked against naga's reflection of every variant ----

/// A variant's module with its override constants applied (array sizes and workgroup sizes
/// resolved), as the driver sees it.
fn resolved(variant: &Variant) -> naga::Module {
    let name = variant.name();
    let (module, info) = module(&variant.source(), &name);
    let constants: naga::back::PipelineConstants = variant
        .constants()
        .iter()
        .map(|&(k, v)| (k.to_string(), v as f64))
        .collect();
    naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
        .unwrap_or_else(|e| panic!("{name}: overrides: {e:?}"))
        .0
        .into_owned()
}

/// Bytes of workgroup memory a module declares.
fn workgroup_bytes(module: &naga::Module) -> u64 {
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("layout");
    module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| layouter[g.ty].size as u64)
        .sum()
}

/// The bind-group tables in `kernels/mod.rs` (`Shader::bindings`, which the engine turns into the
/// explicit layouts it creates pipelines with) agree with every module: each resource the entry
/// point uses is in the table with its kind (uniform, read-only or read-write storage), and each
/// table entry is declared by the module with that kind (a resource declared by a shared file
/// but not used, like `aux` in the softmax pass, needs no entry).
#[test]
fn bind_group_tables_match_every_module() {
    use spotlight::kernels::Binding;
    for shader in Shader::ALL {
        let name = shader.name();
        let (module, info) = module(&shader.source(), name);
        let ep = info.get_entry_point(0);
        let table = shader.bindings();
        let mut used = 0;
        for (h, g) in module.global_variables.iter() {
            let Some(rb) = g.binding.as_ref() else {
                continue;
            };
            assert_eq!(rb.group, 0, "{name}: a binding outside group 0");
            let kind = match g.space {
                naga::AddressSpace::Uniform => Binding::Uniform,
                naga::AddressSpace::Storage { access }
                    if access.contains(naga::StorageAccess::STORE) =>
                {
                    Binding::ReadWrite
                }
                naga::AddressSpace::Storage { .. } => Binding::Read,
                other => panic!("{name}: binding {} in {other:?}", rb.binding),
            };
            let entry = table.iter().find(|e| e.0 == rb.binding);
            if ep[h].is_empty() {
                // Declared, unused: if the table has it, the kinds must still agree.
                if let Some(e) = entry {
                    assert_eq!(e.1, kind, "{name}: binding {} kind", rb.binding);
                }
                continue;
            }
            used += 1;
            let var = g.name.as_deref().unwrap_or("?");
            let e = entry.unwrap_or_else(|| {
                panic!(
                    "{name}: `{var}` (binding {}) is used but not in kernels/mod.rs's table",
                    rb.binding
                )
            });
            assert_eq!(
                e.1, kind,
                "{name}: `{var}` (binding {}): table kind vs shader",
                rb.binding
            );
        }
        for e in table {
            let declared = module
                .global_variables
                .iter()
                .any(|(_, g)| g.binding.as_ref().is_some_and(|b| b.binding == e.0));
            assert!(
                declared,
                "{name}: kernels/mod.rs's table has binding {} that the shader lacks",
                e.0
            );
        }
        assert!(used > 0, "{name}: no resource used");
    }
}

/// Every uniform block the host writes (`spotlight::params::uniform_blocks`, declared once with
/// `uniform_block!`) has the size, member names, order and offsets of the WGSL struct of the
/// same name, in every module that declares it.
#[test]
fn uniform_blocks_match_the_wgsl_structs() {
    for (name, size, fields) in spotlight::params::uniform_blocks() {
        let mut seen = 0;
        for shader in Shader::ALL {
            let (module, _) = module(&shader.source(), shader.name());
            let Some((h, ty)) = module
                .types
                .iter()
                .find(|(_, t)| t.name.as_deref() == Some(name))
            else {
                continue;
            };
            seen += 1;
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).expect("layout");
            let at = format!("{name} in {}", shader.name());
            assert_eq!(
                layouter[h].size as usize, size,
                "{at}: WGSL size vs host size"
            );
            let naga::TypeInner::Struct { members, .. } = &ty.inner else {
                panic!("{at} is not a struct")
            };
            let wgsl: Vec<(&str, usize)> = members
                .iter()
                .map(|m| (m.name.as_deref().unwrap_or("?"), m.offset as usize))
                .collect();
            assert_eq!(
                wgsl, fields,
                "{at}: WGSL members and offsets (left) vs the host's (right)"
            );
        }
        assert!(seen > 0, "no shader declares the uniform block {name}");
    }
}

/// The fused kernels' workgroup size and workgroup memory, as the driver will see them, are
/// what the host's tile choosers assume (`FlashTiles::threads`/`workgroup_bytes`,
/// `CoopTiles::rows`/`bytes`): a change to a shader's tile arrays or workgroup size that the
/// chooser does not follow fails here, not on a GPU with less memory.
#[test]
fn tile_choosers_match_the_declared_workgroups() {
    let mut checked = 0;
    for variant in variants() {
        let name = variant.name();
        let c = |k: &str| {
            variant
                .constants()
                .iter()
                .find(|x| x.0 == k)
                .map(|x| x.1)
                .unwrap_or_else(|| panic!("{name}: no constant {k}"))
        };
        let module = resolved(&variant);
        let size = module.entry_points[0].workgroup_size;
        let bytes = workgroup_bytes(&module);
        let (d, dv) = match variant.shader() {
            Shader::Flash | Shader::FlashRows | Shader::FlashDecode | Shader::FlashCoop => {
                (c("HEAD_DIM"), c("V_DIM"))
            }
            Shader::Backward(
                BackwardPass::KeyValueRows
                | BackwardPass::QueryRows
                | BackwardPass::QueryFromGradients,
            ) => (c("HEAD_DIM"), c("V_DIM")),
            _ => continue,
        };
        let (threads, expect_bytes) = if let Shader::Backward(_) = variant.shader() {
            // No workgroup memory in the backward's row kernels: their rows in registers,
            // operands and sums by shuffles.
            (c("WG"), 0)
        } else if variant.shader() == Shader::Flash {
            let t = FlashTiles {
                bq: c("BQ"),
                bk: c("BK"),
                tpr: c("TPR"),
                layout: FlashLayout::Tiled,
            };
            (t.threads(), t.workgroup_bytes(d, dv))
        } else if variant.shader() == Shader::FlashRows {
            let t = FlashTiles::rows(c("WG"), c("ROWS"));
            (t.threads(), t.workgroup_bytes(d, dv))
        } else if variant.shader() == Shader::FlashDecode {
            let t = FlashTiles::decode(c("ROWS"), c("WG"));
            (t.threads(), t.workgroup_bytes(d, dv))
        } else {
            let t = CoopTiles {
                edge: c("EDGE"),
                wg: c("WG"),
                ns: c("NS"),
                bk: c("BK"),
            };
            (t.ns * t.wg, t.bytes(d, dv) as u64)
        };
        assert_eq!(
            size,
            [threads, 1, 1],
            "{name}: workgroup size vs the host's"
        );
        assert_eq!(bytes, expect_bytes, "{name}: workgroup bytes vs the host's");
        checked += 1;
    }
    assert!(checked > 100, "only {checked} fused variants checked");
}

/// `kernels::unroll_marked`, which the row kernel's registers depend on: nested marked loops
/// become blocks with constant indices (`const i = 0u;` ...), unmarked loops stay, braces in
/// comments do not count, and both the input and the result are valid WGSL.
#[test]
fn unroll_marked_unrolls_nested_marked_loops_only() {
    let src = "var<private> x: array<u32, 3>;\n\
               var<private> y: array<u32, 2>;\n\
               fn f() {\n    \
                   for (var i = 0u; i < N; i++) { // unroll\n        \
                       for (var j = 0u; j < 2u; j++) { // unroll\n            \
                           x[i] += y[j]; // { braces in comments do not count }\n        \
                       }\n        \
                       for (var k = 0u; k < 2u; k++) {\n            \
                           x[i] += y[k];\n        \
                       }\n    \
                   }\n\
               }\n";
    let out = spotlight::kernels::unroll_marked(src, &[("N", 3), ("2u", 2)]);
    assert!(!out.contains("// unroll"), "{out}");
    assert_eq!(out.matches("x[i] += y[j];").count(), 6, "{out}");
    assert_eq!(out.matches("x[i] += y[k];").count(), 3, "{out}");
    for i in 0..3 {
        assert_eq!(out.matches(&format!("const i = {i}u;")).count(), 1, "{out}");
    }
    assert_eq!(out.matches("const j = 1u;").count(), 3, "{out}");
    let src_ok = src.replace("i < N", "i < 3u");
    module(&src_ok, "unroll input");
    module(&out, "unrolled");
}

/// `kernels::expand_marked`, which holds flash-coop's Q fragments and O accumulators: a block
/// becomes N copies in the enclosing scope with `{X}` numbered, nested blocks expand both names,
/// text outside blocks stays, and the result is valid WGSL that uses the numbered variables.
#[test]
fn expand_marked_numbers_copies_in_the_enclosing_scope() {
    let src = "fn f() -> u32 {\n    \
                   // each t < N {\n    \
                   var a_{t} = {t}u;\n    \
                   // } each t\n    \
                   // each t < N {\n    \
                   // each u < M {\n    \
                   a_{t} += {u}u * 10u;\n    \
                   // } each u\n    \
                   // } each t\n    \
                   return a_0 + a_1 + a_2;\n\
               }\n";
    let out = spotlight::kernels::expand_marked(src, &[("N", 3), ("M", 2)]);
    assert!(
        !out.contains("// each") && !out.contains("{t}") && !out.contains("{u}"),
        "{out}"
    );
    for t in 0..3 {
        assert_eq!(
            out.matches(&format!("var a_{t} = {t}u;")).count(),
            1,
            "{out}"
        );
        for u in 0..2 {
            let line = format!("a_{t} += {u}u * 10u;");
            assert_eq!(out.matches(&line).count(), 1, "{out}");
        }
    }
    // Copies keep their order: a_0's lines before a_1's.
    assert!(
        out.find("a_0 += 1u").unwrap() < out.find("a_1 += 0u").unwrap(),
        "{out}"
    );
    module(&out, "expanded");
}

/// Every flash-coop variant has its blocks expanded (a marker left would leave `{t}` in the
/// WGSL) and holds one Q fragment per EDGE columns of the head dim.
#[test]
fn flash_coop_variants_hold_one_fragment_per_block() {
    let mut checked = 0;
    for v in variants()
        .into_iter()
        .filter(|v| v.shader() == Shader::FlashCoop)
    {
        let src = v.source();
        let left = src
            .lines()
            .any(|l| l.trim().starts_with("// each ") && l.trim().ends_with(" {"));
        assert!(
            !left && !src.contains("{t}") && !src.contains("{u}"),
            "{}",
            v.name()
        );
        let c = |k: &str| v.constants().iter().find(|x| x.0 == k).unwrap().1;
        let n = c("HEAD_DIM") / c("EDGE");
        assert_eq!(src.matches("let qf_").count() as u32, n, "{}", v.name());
        assert!(src.contains(&format!("let qf_{} =", n - 1)), "{}", v.name());
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} flash-coop variants");
}

/// Every row-kernel variant has all its marked loops unrolled (a marker left behind would mean
/// a register array indexed dynamically, i.e. memory on a CPU adapter).
#[test]
fn row_kernel_variants_have_no_marked_loops_left() {
    let rows: Vec<Variant> = variants()
        .into_iter()
        .filter(|v| {
            matches!(
                v.shader(),
                Shader::FlashRows
                    | Shader::FlashDecode
                    | Shader::Backward(
                        BackwardPass::KeyValueRows
                            | BackwardPass::QueryRows
                            | BackwardPass::QueryFromGradients
                    )
            )
        })
        .collect();
    assert!(rows.len() > 100, "only {} row-kernel variants", rows.len());
    for v in rows {
        let src = v.source();
        assert!(!src.contains("{ // unroll"), "{}: marker left", v.name());
        // The wide K/V loads and the native f16 rewrite never meet: one of the two or neither.
        if v.constants().contains(&("VEC4_KV", 1)) {
            assert!(src.contains("array<vec"), "{}: no wide binding", v.name());
        }
    }
}

/// The row kernels' rows per workgroup: the forward's 16 from 64 rows per unit (decoding keeps 8
/// however long the cache), the backward's 16 from `ROWS_LARGE_LOGITS` logits with at least 64
/// rows, else 8.
#[test]
fn row_count_takes_sixteen_rows_only_for_large_problems() {
    // Forward: 32 from 128 rows with at most two output vec4 columns per lane in a problem of
    // ROWS_LARGE_LOGITS logits, 16 from 64.
    let large = FlashTiles::ROWS_LARGE_LOGITS;
    assert_eq!(FlashTiles::row_count(128, 64, 8, large), 32);
    assert_eq!(FlashTiles::row_count(128, 64, 8, large - 1), 16);
    assert_eq!(FlashTiles::row_count(128, 65, 8, large), 16);
    assert_eq!(FlashTiles::row_count(128, 64, 4, large), 16);
    assert_eq!(FlashTiles::row_count(127, 64, 8, large), 16);
    assert_eq!(FlashTiles::row_count(64, 128, 8, 0), 16);
    assert_eq!(FlashTiles::row_count(63, 64, 8, large), 8);
    assert_eq!(FlashTiles::row_count(0, 0, 8, 0), 8);
    assert_eq!(FlashTiles::BACKWARD_ROWS_R, [8, 16]);
    assert_eq!(FlashTiles::backward_row_count(large, 64), 16);
    assert_eq!(FlashTiles::backward_row_count(large - 1, 64), 8);
    assert_eq!(FlashTiles::backward_row_count(large * 1024, 63), 8);
    assert_eq!(FlashTiles::backward_row_count(0, 0), 8);
    assert!(FlashTiles::ROWS_R.contains(&16) && FlashTiles::ROWS_R.contains(&8));
}

/// The engine compiles its modules without naga's forced loop bounds (`kernels::build`: a
/// 64-bit counter and a break in every loop, 0.25-0.3 s of the row kernel's compile on
/// lavapipe), which is sound only if no loop can run forever. So every loop must be a `for`
/// whose counter is a local variable that the loop header alone moves, one way: tested against
/// `counter < bound` (or `<=`, a bound that nothing in the loop changes) and increased (`++`, `+= step` with no literal step of 0 or
/// less), or tested against `counter > 0u` and halved (`>>= 1u`). No `loop`, `while` or
/// `break if`; the body never stores to the counter nor passes it to a function by pointer.
#[test]
fn every_loop_moves_its_counter_towards_its_bound() {
    use naga::{BinaryOperator as B, Block, Expression as E, Literal, Statement as S};

    fn local(f: &naga::Function, e: naga::Handle<E>) -> Option<naga::Handle<naga::LocalVariable>> {
        match f.expressions[e] {
            E::LocalVariable(l) => Some(l),
            _ => None,
        }
    }
    fn loaded(f: &naga::Function, e: naga::Handle<E>) -> Option<naga::Handle<naga::LocalVariable>> {
        match f.expressions[e] {
            E::Load { pointer } => local(f, pointer),
            _ => None,
        }
    }
    // The local variables an expression reads (through the operators a loop bound uses).
    fn reads(
        f: &naga::Function,
        e: naga::Handle<E>,
        out: &mut Vec<naga::Handle<naga::LocalVariable>>,
    ) {
        match f.expressions[e] {
            E::Load { pointer } => match local(f, pointer) {
                Some(l) => out.push(l),
                None => reads(f, pointer, out),
            },
            E::Binary { left, right, .. } => {
                reads(f, left, out);
                reads(f, right, out);
            }
            E::Unary { expr, .. } | E::As { expr, .. } => reads(f, expr, out),
            E::Math {
                arg,
                arg1,
                arg2,
                arg3,
                ..
            } => {
                for a in [Some(arg), arg1, arg2, arg3].into_iter().flatten() {
                    reads(f, a, out);
                }
            }
            E::Select {
                condition,
                accept,
                reject,
            } => {
                for a in [condition, accept, reject] {
                    reads(f, a, out);
                }
            }
            E::Access { base, index } => {
                reads(f, base, out);
                reads(f, index, out);
            }
            E::AccessIndex { base, .. } => reads(f, base, out),
            E::LocalVariable(l) => out.push(l),
            _ => {}
        }
    }
    fn non_emit(b: &Block) -> Vec<&S> {
        b.iter().filter(|s| !matches!(s, S::Emit(_))).collect()
    }
    // Whether any statement in `b` (nested too) stores to `l` or passes it by pointer.
    fn touches(f: &naga::Function, b: &Block, l: naga::Handle<naga::LocalVariable>) -> bool {
        b.iter().any(|s| match s {
            S::Store { pointer, .. } => local(f, *pointer) == Some(l),
            S::Call { arguments, .. } => arguments.iter().any(|&a| local(f, a) == Some(l)),
            S::Block(x) => touches(f, x, l),
            S::If { accept, reject, .. } => touches(f, accept, l) || touches(f, reject, l),
            S::Switch { cases, .. } => cases.iter().any(|c| touches(f, &c.body, l)),
            S::Loop {
                body, continuing, ..
            } => touches(f, body, l) || touches(f, continuing, l),
            _ => false,
        })
    }
    fn check(f: &naga::Function, b: &Block, at: &str, loops: &mut usize) {
        for s in b.iter() {
            match s {
                S::Block(x) => check(f, x, at, loops),
                S::If { accept, reject, .. } => {
                    check(f, accept, at, loops);
                    check(f, reject, at, loops);
                }
                S::Switch { cases, .. } => cases.iter().for_each(|c| check(f, &c.body, at, loops)),
                S::Loop {
                    body,
                    continuing,
                    break_if,
                } => {
                    *loops += 1;
                    assert!(break_if.is_none(), "{at}: a loop with `break if`");
                    // The update: counter = counter + step, or counter = counter >> 1.
                    let update = non_emit(continuing);
                    let (l, halves) = match update.as_slice() {
                        [S::Store { pointer, value }] => {
                            let l = local(f, *pointer).unwrap_or_else(|| {
                                panic!("{at}: a loop updates no local variable")
                            });
                            match f.expressions[*value] {
                                E::Binary {
                                    op: B::Add,
                                    left,
                                    right,
                                } if loaded(f, left) == Some(l) => {
                                    let step_ok = match f.expressions[right] {
                                        E::Literal(Literal::U32(x)) => x > 0,
                                        E::Literal(Literal::I32(x)) => x > 0,
                                        E::Unary { .. } => false,
                                        _ => true,
                                    };
                                    assert!(step_ok, "{at}: a loop step that is not positive");
                                    (l, false)
                                }
                                E::Binary {
                                    op: B::ShiftRight,
                                    left,
                                    right,
                                } if loaded(f, left) == Some(l)
                                    && matches!(
                                        f.expressions[right],
                                        E::Literal(Literal::U32(1))
                                    ) =>
                                {
                                    (l, true)
                                }
                                ref other => panic!(
                                    "{at}: a loop update {other:?} (expected `+= step` or `>>= 1u`)"
                                ),
                            }
                        }
                        other => panic!(
                            "{at}: a loop whose update is {other:?} (expected a `for` with one counter update)"
                        ),
                    };
                    let name = f.local_variables[l].name.clone().unwrap_or_default();
                    // The test: the first statement, `if counter < bound {} else { break }`
                    // (Calls in the test, such as `opaque(D4)`, come before it.)
                    let first = non_emit(body);
                    let test = first.iter().find(|s| !matches!(s, S::Call { .. }));
                    match test {
                        Some(S::If {
                            condition,
                            accept,
                            reject,
                        }) => {
                            assert!(
                                accept.is_empty()
                                    && matches!(non_emit(reject).as_slice(), [S::Break]),
                                "{at}: loop over `{name}` does not start with its test"
                            );
                            match f.expressions[*condition] {
                                E::Binary { op, left, right } if loaded(f, left) == Some(l) => {
                                    // The bound: nothing it reads changes inside the loop.
                                    let mut bound = Vec::new();
                                    reads(f, right, &mut bound);
                                    for x in bound {
                                        assert!(
                                            !touches(f, body, x) && !touches(f, continuing, x),
                                            "{at}: the bound of the loop over `{name}` changes inside it"
                                        );
                                    }
                                    if halves {
                                        assert!(
                                            op == B::Greater
                                                && matches!(
                                                    f.expressions[right],
                                                    E::Literal(Literal::U32(0))
                                                ),
                                            "{at}: `{name}` halves but is not tested `> 0u`"
                                        );
                                    } else {
                                        assert!(
                                            matches!(op, B::Less | B::LessEqual),
                                            "{at}: `{name}` grows but is tested with {op:?}"
                                        );
                                    }
                                }
                                ref other => panic!(
                                    "{at}: loop over `{name}` tests {other:?}, not the counter"
                                ),
                            }
                        }
                        other => {
                            panic!("{at}: loop over `{name}` starts with {other:?}, not its test")
                        }
                    }
                    assert!(
                        !touches(f, body, l),
                        "{at}: the body of the loop over `{name}` changes it"
                    );
                    check(f, body, at, loops);
                }
                _ => {}
            }
        }
    }

    let mut loops = 0;
    for shader in Shader::ALL {
        let (module, _) = module(&shader.source(), shader.name());
        for (_, f) in module.functions.iter() {
            let at = format!("{}::{}", shader.name(), f.name.as_deref().unwrap_or("?"));
            check(f, &f.body, &at, &mut loops);
        }
        for e in &module.entry_points {
            check(
                &e.function,
                &e.function.body,
                &format!("{}::{}", shader.name(), e.name),
                &mut loops,
            );
        }
    }
    assert!(loops > 200, "only {loops} loops checked");
}

/// The dQ row pass groups four keys per accumulator update up to the forward row kernel's bound
/// on output columns per lane (`FlashTiles::ROWS_PV_GROUPED_COLUMNS`): one number in two places.
#[test]
fn dq_row_pass_groups_keys_up_to_the_forward_bound() {
    let (_, src) = source::FILES
        .iter()
        .find(|(name, _)| *name == "backward_dq_rows.wgsl")
        .expect("backward_dq_rows.wgsl");
    let line = format!(
        "const KEYS_PER_UPDATE_MAX_COLS: u32 = {}u;",
        FlashTiles::ROWS_PV_GROUPED_COLUMNS
    );
    assert!(src.contains(&line), "backward_dq_rows.wgsl lacks `{line}`");
}

/// The backward's column-owning row kernels (dK/dV and the recomputing dQ pass): the
/// reduce-scatter's rewritten constants agree with the override in every variant (lanes, partial
/// sums max(R, lanes), keys or rows per lane, every key or row owned by exactly one lane), and
/// neither declares workgroup memory (their rows live in registers at every head dim).
#[test]
fn backward_row_kernels_own_columns_and_reduce_by_shuffles() {
    let (mut kv, mut q) = (0, 0);
    for variant in variants() {
        let name = variant.name();
        let constants = variant.constants();
        let c = |k: &str| {
            constants
                .iter()
                .find(|x| x.0 == k)
                .map(|x| x.1)
                .unwrap_or_else(|| panic!("{name}: no constant {k}"))
        };
        let src = variant.source();
        let has = |k: &str, v: u32| {
            let line = format!("const {k}: u32 = {v}u;");
            assert!(src.contains(&line), "{name}: no `{line}`");
        };
        match variant.shader() {
            Shader::Backward(BackwardPass::KeyValueRows) => kv += 1,
            Shader::Backward(BackwardPass::QueryRows) => q += 1,
            _ => continue,
        }
        let (lanes, rows) = (c("WG"), c("ROWS"));
        let sums = rows.max(lanes);
        has("LW", lanes);
        has("RS", sums);
        has("OPL", sums / lanes);
        let chunks = |dim: u32| dim.div_ceil(4).div_ceil(lanes);
        has("NK8", chunks(c("HEAD_DIM")));
        has("NV8", chunks(c("V_DIM")));
        assert!(
            lanes.is_power_of_two(),
            "{name}: the reduce-scatter needs 2^k lanes"
        );
        assert_eq!(sums % lanes, 0, "{name}: positions split unevenly");
        assert!(
            sums / lanes * lanes >= rows,
            "{name}: a position without a lane"
        );
        assert!(!src.contains("var<workgroup>"), "{name}: workgroup memory");
        assert!(
            src.contains("fn reduce_scatter("),
            "{name}: no reduce-scatter"
        );
    }
    assert!(kv >= 10 && q >= 10, "{kv} dK/dV, {q} dQ variants");
}
