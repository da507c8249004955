//! `spotlight info`.

use spotlight::{Engine, EngineOptions, adapter_report};

pub fn main() -> anyhow::Result<()> {
    let (infos, chosen, why) = adapter_report(&EngineOptions::default());
    if infos.is_empty() {
        println!("No adapters found.");
        println!(
            "For a software adapter on Linux: apt-get install mesa-vulkan-drivers libvulkan1, then WGPU_BACKEND=vulkan."
        );
        return Ok(());
    }
    println!("Adapters:");
    for (n, i) in infos.iter().enumerate() {
        let mark = if Some(n) == chosen { "*" } else { " " };
        println!(
            " {mark} [{n}] {} — backend {:?}, type {:?}, driver {} {}",
            i.name, i.backend, i.device_type, i.driver, i.driver_info
        );
    }
    match chosen {
        Some(n) => println!("Chosen: [{n}] because {why}"),
        None => println!("Chosen: none ({why})"),
    }
    let engine = Engine::new()?;
    let c = engine.capabilities();
    println!("Capabilities of {}:", engine.describe());
    println!("  shader f16:            {}", c.shader_f16);
    println!(
        "  subgroups:             {} (size {}..={})",
        c.subgroups, c.subgroup_min_size, c.subgroup_max_size
    );
    println!("  cooperative matrices:  {}", c.cooperative_matrix);
    match c.coop_edge {
        0 => println!("  flash-coop:            no (needs 16x16x16 or 8x8x8 f16 -> f32 matrices)"),
        e => println!(
            "  flash-coop:            {e}x{e}x{e} f16 -> f32 matrices, subgroups of {}; {}",
            c.subgroup_max_size,
            if engine.auto_matrix_units() {
                "auto uses it for f16 after a self-test"
            } else {
                "auto does not use it (emulated on a CPU adapter; --algorithm flash-coop forces it)"
            }
        ),
    }
    println!("  timestamp queries:     {}", c.timestamp_query);
    println!("Limits:");
    println!("  storage binding:       {} bytes", c.max_storage_binding);
    println!("  buffer size:           {} bytes", c.max_buffer_size);
    println!("  workgroup memory:      {} bytes", c.max_workgroup_memory);
    println!("  invocations/workgroup: {}", c.max_invocations);
    println!("  workgroups/dimension:  {}", c.max_workgroups_per_dim);
    println!(
        "  storage buffers/stage: {}",
        c.max_storage_buffers_per_stage
    );
    Ok(())
}
