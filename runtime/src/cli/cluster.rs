//! `weir cluster status`: the cluster as one node sees it (its HTTP API's `GET /cluster`);
//! `weir cluster add-voter|remove-voter`: changes to the controller voters.

use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Nodes, roles, the Raft leader, fenced nodes, under-replicated and offline partitions,
    /// and where each pipeline runs.
    Status {
        #[command(flatten)]
        api: super::HttpApiArgs,
        /// Print the raw JSON
        #[arg(long)]
        json: bool,
    },
    /// Make a node that joined as an observer a controller voter (Raft membership).
    AddVoter {
        /// The node's id
        id: i32,
        #[command(flatten)]
        api: super::HttpApiArgs,
    },
    /// Make a controller voter an observer again, for instance a voter whose machine is gone,
    /// so that the quorum needs a majority of the voters that remain.
    RemoveVoter {
        /// The node's id
        id: i32,
        #[command(flatten)]
        api: super::HttpApiArgs,
    },
}

pub async fn run(cmd: ClusterCommand) -> Result<()> {
    let (api, json) = match cmd {
        ClusterCommand::Status { api, json } => (api, json),
        ClusterCommand::AddVoter { id, api } => {
            return change_voters(reqwest::Method::POST, id, api).await
        }
        ClusterCommand::RemoveVoter { id, api } => {
            return change_voters(reqwest::Method::DELETE, id, api).await
        }
    };
    let body = super::http_api(reqwest::Method::GET, &api, "/cluster", None)
        .await
        .with_context(|| format!("{}/cluster", api.url))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    print!(
        "{}",
        render(&body).ok_or_else(|| anyhow!("unexpected answer from {}", api.url))?
    );
    Ok(())
}

async fn change_voters(method: reqwest::Method, id: i32, api: super::HttpApiArgs) -> Result<()> {
    let path = format!("/cluster/voters/{id}");
    let body = super::http_api(method, &api, &path, None)
        .await
        .with_context(|| format!("{}{path}", api.url))?;
    let voters: Vec<String> = body["voters"]
        .as_array()
        .ok_or_else(|| anyhow!("unexpected answer from {}", api.url))?
        .iter()
        .map(|v| v.to_string())
        .collect();
    println!("voters: {}", voters.join(", "));
    Ok(())
}

fn render(s: &Value) -> Option<String> {
    let mut out = String::new();
    let raft = &s["raft"];
    out += &format!(
        "cluster {}  (seen from node {})\nraft leader: {}  term {}  applied {}\n\nnodes:\n",
        s["cluster_id"].as_str()?,
        s["node_id"],
        raft["leader"],
        raft["term"],
        raft["last_applied"]
    );
    for n in s["nodes"].as_array()? {
        let mut role = vec![if n["voter"].as_bool()? {
            "voter"
        } else {
            "observer"
        }];
        if n["id"] == raft["leader"] {
            role.push("controller");
        }
        if n["fenced"].as_bool()? {
            role.push("FENCED");
        }
        out += &format!(
            "  {:>3}  kafka {}  cluster {}  rack {}  leads {}  [{}]\n",
            n["id"],
            n["kafka"].as_str()?,
            n["cluster"].as_str()?,
            n["rack"].as_str().unwrap_or("-"),
            n["leader_of"],
            role.join(", ")
        );
    }
    out += &format!(
        "\n{} topic(s), {} partition(s)\n",
        s["topics"], s["partitions"]
    );
    for (title, key) in [
        ("under-replicated", "under_replicated"),
        ("offline", "offline"),
    ] {
        let list = s[key].as_array()?;
        out += &format!("{title} partitions: {}\n", list.len());
        for p in list {
            out += &format!(
                "  {}-{}  leader {}  epoch {}  replicas {}  isr {}\n",
                p["topic"].as_str()?,
                p["partition"],
                p["leader"],
                p["leader_epoch"],
                p["replicas"],
                p["isr"]
            );
        }
    }
    // Older nodes do not report pipelines.
    if let Some(pipelines) = s["pipelines"].as_object() {
        out += &format!("pipelines: {}\n", pipelines.len());
        for (name, node) in pipelines {
            out += &format!("  {name}  on node {node}\n");
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_rendered() {
        let s = serde_json::json!({
            "cluster_id": "abc", "node_id": 1,
            "raft": {"leader": 2, "term": 3, "state": "Follower", "last_applied": 40},
            "nodes": [
                {"id": 1, "kafka": "h:1", "cluster": "h:11", "rack": null, "voter": true, "fenced": false, "leader_of": 2},
                {"id": 2, "kafka": "h:2", "cluster": "h:12", "rack": "r", "voter": true, "fenced": true, "leader_of": 0},
            ],
            "topics": 1, "partitions": 2,
            "under_replicated": [{"topic": "t", "partition": 0, "leader": 1, "leader_epoch": 1, "replicas": [1, 2], "isr": [1]}],
            "offline": [],
            "pipelines": {"orders": 2},
        });
        let text = render(&s).unwrap();
        assert!(text.contains("raft leader: 2"), "{text}");
        assert!(text.contains("[voter, controller, FENCED]"), "{text}");
        assert!(
            text.contains("t-0  leader 1  epoch 1  replicas [1,2]  isr [1]"),
            "{text}"
        );
        assert!(text.contains("offline partitions: 0"), "{text}");
        assert!(text.contains("orders  on node 2"), "{text}");
    }
}
