//! Every WGSL module parses and validates with naga, and every variant the engine builds
//! translates to SPIR-V (with the bounds-check policy wgpu uses), MSL, HLSL and GLSL. No GPU needed.

use spotlight::kernels::{CoopTiles, FlashTiles, Shader, Variant, source};
use spotlight::reference::DType;

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
    let mut out = vec![Variant::softmax(), Variant::merge(), Variant::stream()];
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
                        out.push(Variant::flash([dt, dt, dt], d, dv, t, gqa, paged));
                    }
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
        .filter(|v| v.shader == Shader::Flash)
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
                out.push(v);
            }
        }
    }
    out
}

#[test]
fn every_shader_file_is_used_by_a_module() {
    for (name, src) in source::FILES {
        let used = Shader::ALL.iter().any(|s| s.source().contains(src));
        assert!(used, "{name} is in shaders/ but no kernel includes it");
    }
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

#[test]
fn every_variant_translates_to_every_backend() {
    let vs = variants();
    assert!(vs.len() > 30, "expected many variants, got {}", vs.len());
    for variant in vs {
        let name = variant.name();
        let (module, info) = module(&variant.source(), &name);
        let constants: naga::back::PipelineConstants = variant
            .constants
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
            lang_version: if variant.shader == Shader::FlashCoop {
                (2, 3)
            } else {
                (2, 1)
            },
            ..Default::default()
        };
        let (msl, _) = naga::back::msl::write_string(&module, &info, &msl_opts, &msl_pipeline)
            .unwrap_or_else(|e| panic!("{name}: MSL: {e:?}"));
        assert!(msl.contains("kernel"), "{name}: MSL has no kernel");

        if variant.shader == Shader::FlashCoop {
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
