//! A map that returns every record unchanged: the cost of the plugin stage itself (batch
//! encoding, the call into the module, decoding), measured by `weir plugin bench`.

use weir_plugin_sdk::{Error, Record};

fn pass(record: Record) -> Result<Record, Error> {
    Ok(record)
}

weir_plugin_sdk::export_map!(pass);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_unchanged() {
        let mut r = Record::new("v")
            .with_key("k")
            .with_header("h", "x")
            .with_timestamp(7);
        r.topic = Some("t".into());
        r.partition = Some(1);
        r.offset = Some(9);
        let out = weir_plugin_sdk::testing::run_map(pass, std::slice::from_ref(&r));
        assert_eq!(weir_plugin_sdk::testing::records(&out), vec![&r]);
    }
}
